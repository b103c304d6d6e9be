"""Budgets per user: requests per minute and weighted tokens per day and month, kept."""

from __future__ import annotations

from datetime import UTC, datetime

import openai
import pytest
import requests
from gevent.event import Event

from ollamamq import create_app
from ollamamq.accesslog import OBSERVERS_KEY
from ollamamq.budgets import periods
from tests.conftest import served, settings
from tests.real_servers import redis_server
from tests.test_clients import HI

NOON = datetime(2030, 6, 15, 12, 0, tzinfo=UTC).timestamp()  # a frozen clock: no calendar
CHAT = {"model": "llama3", "messages": HI, "stream": False}


def frozen(app) -> Event:
    """Freeze the budgets' clock at NOON; the event is set each time a request is counted."""
    app.extensions["ollamamq.budgets"].clock = lambda: NOON
    counted = Event()
    app.extensions[OBSERVERS_KEY].append(lambda record: counted.set())
    return counted


def chat(url: str, user: str = "ana") -> requests.Response:
    return requests.post(f"{url}/api/chat", json=CHAT, headers={"X-User-ID": user}, timeout=10)


def served_and_counted(url: str, counted: Event, user: str = "ana") -> None:
    counted.clear()
    assert chat(url, user).status_code == 200
    assert counted.wait(10)  # the tokens are counted when the response has closed


@pytest.mark.parametrize("config", [{"DEFAULT_TOKENS_PER_DAY": 17}])
def test_the_request_that_crosses_the_daily_budget_is_served_and_the_next_gets_429(app, proxy):
    counted = frozen(app)
    served_and_counted(proxy, counted)  # 8 output tokens x 2 + the prompt: past 17
    refused = chat(proxy)
    assert refused.status_code == 429 and "tokens per day" in refused.json()["error"]
    _, midnight = periods(NOON)["day"]
    assert int(refused.headers["Retry-After"]) == int(midnight - NOON) + 1  # 12 h
    assert refused.headers["X-RateLimit-Limit"] == "17"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.headers["X-RateLimit-Reset"] == str(int(midnight))
    assert chat(proxy, "bob").status_code == 200  # budgets are per user
    assert requests.get(f"{proxy}/api/tags", headers={"X-User-ID": "ana"}).status_code == 200
    with openai.OpenAI(
        base_url=f"{proxy}/v1", api_key="x", default_headers={"X-User-ID": "ana"}, max_retries=0
    ) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="llama3", messages=HI)


def test_a_restart_keeps_the_count(fake, tmp_path):
    config = settings(
        [fake.url],
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'budgets.db'}",
        DEFAULT_TOKENS_PER_MONTH=17,
    )
    first = create_app(config)
    counted = frozen(first)
    with served(first) as url:
        served_and_counted(url, counted)
    again = create_app(config)
    frozen(again)
    with served(again) as url:
        refused = chat(url)
        assert refused.status_code == 429 and "tokens per month" in refused.json()["error"]
        used = again.extensions["ollamamq.budgets"].usage("ana")
        assert used["month"] >= 17 and used["day"] == used["month"]


def test_an_operator_sets_one_users_budget_which_survives_a_restart(fake, tmp_path):
    database = f"sqlite:///{tmp_path / 'b.db'}"
    config = settings([fake.url], SQLALCHEMY_DATABASE_URI=database, ADMIN_PASSWORD="pw")
    admin = {"Authorization": "Bearer pw"}
    first = create_app(config)
    counted = frozen(first)
    with served(first) as url:
        budget = {"tokens_per_day": 17, "requests_per_minute": 100}
        changed = requests.post(
            f"{url}/admin/api/users/ana/settings", json=budget, headers=admin, timeout=10
        )
        assert changed.status_code == 200
        served_and_counted(url, counted)
        assert chat(url).status_code == 429
        users = requests.get(f"{url}/admin/api/users", headers=admin, timeout=10).json()["users"]
        (ana,) = [u for u in users if u["user"] == "ana"]
        assert ana["budget"]["tokens_per_day"] == 17 and ana["budget"]["percent_day"] == 100
        page = requests.get(f"{url}/admin/fragment/users", headers=admin, timeout=10).text
        assert 'class="meter"' in page and "100%" in page
        bad = requests.post(
            f"{url}/admin/api/users/ana/settings",
            json={"tokens_per_day": -1},
            headers=admin,
            timeout=10,
        )
        assert bad.status_code == 400
    again = create_app(config)
    frozen(again)
    with served(again) as url:
        assert chat(url).status_code == 429
        assert chat(url, "bob").status_code == 200


def requests_per_minute_are_limited(url: str) -> None:
    statuses = [chat(url).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = chat(url)
    assert "requests per minute" in refused.json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert chat(url, "bob").status_code == 200


@pytest.mark.parametrize("config", [{"DEFAULT_REQUESTS_PER_MINUTE": 2}])
def test_requests_per_minute_with_the_in_memory_storage(proxy):
    requests_per_minute_are_limited(proxy)


def test_requests_per_minute_with_redis_storage(fake):
    with redis_server() as redis_url:
        app = create_app(
            settings([fake.url], RATELIMIT_STORAGE_URI=redis_url, DEFAULT_REQUESTS_PER_MINUTE=2)
        )
        with served(app) as url:
            requests_per_minute_are_limited(url)
