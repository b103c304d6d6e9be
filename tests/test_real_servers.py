"""The download queue on PostgreSQL and the pull quota in Redis, both real servers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
import requests
import sqlalchemy

from ollamamq import create_app
from tests.conftest import served, settings
from tests.processes import BIN, ROOT
from tests.real_servers import postgres_server, redis_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def fresh_postgres(postgres_url: str) -> str:
    """The server with an empty schema."""
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return postgres_url


def pull(url: str, model: str) -> requests.Response:
    return requests.post(f"{url}/api/pull", json={"model": model, "stream": False}, timeout=10)


def test_download_queue_on_postgresql(fake, fresh_postgres):
    app = create_app(settings([fake.url], SQLALCHEMY_DATABASE_URI=fresh_postgres))
    with served(app) as url:
        first = pull(url, "mistral").json()
        assert pull(url, "MISTRAL:latest").json()["job"] == first["job"]  # the unique index
        requests.post(f"{url}/api/queue/process", json={}, timeout=10)
        app.extensions["ollamamq.pulls"].wait()
        history = requests.get(f"{url}/api/queue", timeout=10).json()["history"]
        assert [(j["model"], j["status"]) for j in history] == [("mistral:latest", "completed")]


def test_migrations_have_no_drift_on_postgresql(fresh_postgres):
    env = {**os.environ, "DATABASE_URL": fresh_postgres, "LOG_FILE": ""}
    flask = [str(BIN / "flask"), "--app", "ollamamq.app:create_app", "db"]
    for step in ("upgrade", "check"):
        done = subprocess.run(
            [*flask, step], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


def test_pull_quota_in_redis_outlives_a_restart(fake, redis_url):
    config = settings([fake.url], RATELIMIT_STORAGE_URI=redis_url, RATE_LIMIT=2)
    with served(create_app(config)) as url:
        assert [pull(url, m).status_code for m in ("m1", "m2")] == [200, 200]
    with served(create_app(config)) as url:  # a new process would see the same counts
        refused = pull(url, "m3")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
