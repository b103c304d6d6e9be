"""Per-user standing orders: weight, VIP and blocked, from the config file and the database."""

from __future__ import annotations

import pytest
import requests
from flask_migrate import upgrade

from ollamamq import create_app
from ollamamq.app import MIGRATIONS
from ollamamq.cli import build_parser, overrides_from
from ollamamq.config import load_config_file
from tests.conftest import served, settings

CONFIG = """
ollama_url = ["http://gpu1:11434#4", "http://gpu2:11434"]
fairness = "requests"
max_queue_per_user = 7

[users.boss]
vip = true

[users.ana]
weight = 2.5

[users.spammer]
blocked = true
"""


def test_config_file_sets_backends_settings_and_users(tmp_path):
    path = tmp_path / "ollamamq.toml"
    path.write_text(CONFIG)
    loaded = load_config_file(str(path))
    assert loaded["OLLAMA_URLS"] == ["http://gpu1:11434#4", "http://gpu2:11434"]
    assert (loaded["FAIRNESS"], loaded["MAX_QUEUE_PER_USER"]) == ("requests", 7)
    assert loaded["USERS"]["ana"] == {"weight": 2.5}
    args = build_parser("0").parse_args(["-c", str(path), "--fairness", "tokens"])
    assert overrides_from(args)["FAIRNESS"] == "tokens"  # the command line wins
    flags = ["--show-queued-in-tags", "--download-concurrency", "3", "-o", "http://a,http://b"]
    assert overrides_from(build_parser("0").parse_args(flags)) == {
        "SHOW_QUEUED_IN_TAGS": True,
        "DOWNLOAD_CONCURRENCY": 3,
        "OLLAMA_URLS": ["http://a", "http://b"],
    }


def test_users_from_the_config_file_are_applied(fake, tmp_path):
    users = {"boss": {"vip": True}, "ana": {"weight": 2.5}, "spammer": {"blocked": True}}
    app = create_app(settings([fake.url], USERS=users))
    with served(app) as url:
        accounts = app.extensions["ollamamq"].queue.accounts
        assert accounts["boss"].is_vip and accounts["ana"].weight == 2.5
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        refused = requests.post(f"{url}/api/generate", json=body, headers={"X-User-ID": "spammer"})
        assert refused.status_code == 403 and "blocked" in refused.json()["error"]
        ok = requests.post(f"{url}/api/generate", json=body, headers={"X-User-ID": "ana"})
        assert ok.status_code == 200


def test_runtime_changes_persist_across_restarts_and_win_over_the_file(fake, tmp_path):
    database = f"sqlite:///{tmp_path / 'users.db'}"
    config = settings([fake.url], SQLALCHEMY_DATABASE_URI=database, USERS={"ana": {"weight": 2.5}})
    first = create_app(config)
    with served(first), first.app_context():
        first.extensions["ollamamq.users"].update("ana", weight=4, vip=True)
        first.extensions["ollamamq.users"].update("eve", blocked=True)
    second = create_app(config)
    with served(second):
        accounts = second.extensions["ollamamq"].queue.accounts
        assert (accounts["ana"].weight, accounts["ana"].is_vip) == (4.0, True)
        assert accounts["eve"].is_blocked


def test_bad_settings_are_refused(app):
    with app.app_context():
        upgrade(directory=MIGRATIONS)
        with pytest.raises(ValueError):
            app.extensions["ollamamq.users"].update("ana", weight=0)
        with pytest.raises(ValueError):
            app.extensions["ollamamq.users"].update("ana", colour="red")
