"""API keys bind each request to a person: fairness, blocks and roles cannot be dodged."""

from __future__ import annotations

import logging
import subprocess
import uuid
from datetime import timedelta

import gevent
import ollama
import openai
import pytest
import requests
from gevent.event import Event
from sqlalchemy import select

from ollamamq.extensions import db
from ollamamq.keys import KEY_PREFIX, digest
from ollamamq.models import ApiKey, utcnow
from tests.processes import BIN
from tests.test_clients import HI, TEXT

CHAT = {"model": "llama3", "messages": HI, "stream": False}


def create(app, user: str, role: str = "user", **kwargs) -> str:
    with app.app_context():
        return app.extensions["ollamamq.keys"].create(user, role, **kwargs)[0]


def chat(url: str, key: str | None = None, user: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if user:
        headers["X-User-ID"] = user
    return requests.post(f"{url}/api/chat", json=CHAT, headers=headers, timeout=10)


def users_seen(app) -> set[str]:
    return {u.user for u in app.extensions["ollamamq"].snapshot().users}


def test_a_key_is_random_shown_once_and_only_its_hash_is_stored(app, proxy):
    key = create(app, "ana", note="laptop")
    assert key.startswith(KEY_PREFIX) and len(key) >= len(KEY_PREFIX) + 43  # 256 bits, base64
    with app.app_context():
        (row,) = db.session.scalars(select(ApiKey)).all()
        assert row.digest == digest(key) and key not in (row.digest, row.prefix, row.note)
        stored = repr([getattr(row, c.name) for c in ApiKey.__table__.columns])
    assert key not in stored and key[len(KEY_PREFIX) :] not in stored
    listed = requests.get(f"{proxy}/admin/api/keys", timeout=10).json()
    assert listed["required"] is True and key not in repr(listed)
    assert listed["keys"][0]["prefix"] == key[:10] and listed["keys"][0]["user"] == "ana"


def test_with_keys_a_user_key_is_its_user_whatever_x_user_id_says(app, proxy):
    key = create(app, "ana")
    assert chat(proxy, key, user="boss").status_code == 200
    assert chat(proxy, key, user=str(uuid.uuid4())).status_code == 200
    assert "ana" in users_seen(app) and "boss" not in users_seen(app)
    assert app.extensions["ollamamq"].users["ana"].served == 2


def test_without_a_key_or_with_a_wrong_one_the_answer_is_401_in_the_paths_dialect(app, proxy):
    create(app, "ana")
    missing = chat(proxy)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    wrong = chat(proxy, KEY_PREFIX + "x" * 43)
    assert wrong.status_code == 401 and "invalid" in wrong.json()["error"]
    v1 = requests.post(f"{proxy}/v1/chat/completions", json={**CHAT}, timeout=10)
    assert v1.status_code == 401 and v1.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(f"{proxy}/health", timeout=10).status_code == 200  # open


def test_the_real_sdks_with_valid_revoked_expired_and_wrong_keys(app, proxy):
    key, gone, old = create(app, "ana"), create(app, "ana"), create(app, "bob", expires_days=1)
    with app.app_context():
        ring = app.extensions["ollamamq.keys"]
        ring.revoke(ring.views()[1].id)  # `gone`, the second newest
        db.session.execute(
            ApiKey.__table__.update()
            .where(ApiKey.digest == digest(old))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
        ring.reload()
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key=key, max_retries=0) as client:
        answer = client.chat.completions.create(model="llama3", messages=HI)
        assert answer.choices[0].message.content == TEXT
    for bad in (gone, old, KEY_PREFIX + "nope"):
        with openai.OpenAI(base_url=f"{proxy}/v1", api_key=bad, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model="llama3", messages=HI)
    with ollama.Client(host=proxy, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.chat(model="llama3", messages=HI).message.content == TEXT
    for bad in (gone, old, "omq_wrong"):
        with ollama.Client(host=proxy, headers={"X-API-Key": bad}) as client:
            with pytest.raises(ollama.ResponseError) as raised:
                client.chat(model="llama3", messages=HI)
            assert raised.value.status_code == 401


def test_a_key_revoked_by_the_cli_is_refused_within_a_reload(app, proxy, tmp_path):
    key = create(app, "ana")
    assert chat(proxy, key).status_code == 200
    ring = app.extensions["ollamamq.keys"]
    reloaded, reload = Event(), ring.reload
    ring.reload = lambda: (reload(), reloaded.set())
    database = app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")
    env = {"DB_PATH": database, "LOG_FILE": "", "PATH": str(BIN)}
    listed = subprocess.run([BIN / "ollamamq", "keys", "list"], env=env, capture_output=True)
    assert b"ana" in listed.stdout and key.encode() not in listed.stdout
    revoked = subprocess.run([BIN / "ollamamq", "keys", "revoke", "1"], env=env, timeout=60)
    assert revoked.returncode == 0
    reloaded.clear()
    reloaded.wait(5)  # the next reload (every second) reads the revocation
    assert chat(proxy, key).status_code == 401


def test_the_cli_creates_a_key_that_works_at_once(app, proxy):
    database = app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")
    env = {"DB_PATH": database, "LOG_FILE": "", "PATH": str(BIN)}
    made = subprocess.run(
        [BIN / "ollamamq", "keys", "create", "carla", "--role", "gateway", "--note", "webui"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = made.stdout.split()[-1]
    assert made.returncode == 0 and key.startswith(KEY_PREFIX)
    ring = app.extensions["ollamamq.keys"]
    reloaded, reload = Event(), ring.reload
    ring.reload = lambda: (reload(), reloaded.set())
    reloaded.wait(5)
    assert chat(proxy, key, user="end-user-1").status_code == 200
    assert "carla:end-user-1" in users_seen(app)


def test_a_gateways_end_users_are_scoped_under_it_and_cannot_be_a_direct_user(app, proxy):
    with pytest.raises(ValueError):
        create(app, "webui:ana")  # no direct user can take a gateway end user's name
    ana, gateway = create(app, "ana"), create(app, "webui", role="gateway")
    assert chat(proxy, gateway, user="ana").status_code == 200
    assert chat(proxy, gateway).status_code == 200  # no end user named: the gateway itself
    assert chat(proxy, ana).status_code == 200
    served = app.extensions["ollamamq"].users
    assert (served["webui:ana"].served, served["webui"].served, served["ana"].served) == (1, 1, 1)


def test_a_blocked_user_stays_blocked_under_any_name_address_or_key(app, proxy):
    first, second = create(app, "mallory"), create(app, "mallory")
    admin = {"Authorization": f"Bearer {create(app, 'root', role='admin')}"}
    assert chat(proxy, first).status_code == 200
    block = requests.post(f"{proxy}/admin/api/users/mallory/block", headers=admin, timeout=10)
    assert block.status_code == 200
    for key, name in ((first, None), (first, "someone-else"), (second, str(uuid.uuid4()))):
        refused = chat(proxy, key, user=name)
        assert refused.status_code == 403 and "blocked" in refused.json()["error"]
    tags = requests.get(f"{proxy}/api/tags", headers={"X-API-Key": second}, timeout=10)
    assert tags.status_code == 403


def test_model_management_needs_an_admin_key(app, proxy, fake):
    user, admin = create(app, "ana"), create(app, "root", role="admin")
    body = {"model": "llama3"}
    refused = requests.delete(
        f"{proxy}/api/delete", json=body, headers={"X-API-Key": user}, timeout=10
    )
    copy = {"source": "llama3", "destination": "mine"}
    copied = requests.post(f"{proxy}/api/copy", json=copy, headers={"X-API-Key": user}, timeout=10)
    assert (refused.status_code, copied.status_code) == (403, 403)
    assert not [r for r in fake.received if r.path in ("/api/delete", "/api/copy")]
    deleted = requests.delete(
        f"{proxy}/api/delete", json=body, headers={"Authorization": f"Bearer {admin}"}, timeout=10
    )
    assert deleted.status_code == 200
    assert [r.path for r in fake.received if r.path == "/api/delete"] == ["/api/delete"]
    admin_api = requests.get(f"{proxy}/admin/api/keys", headers={"X-API-Key": admin}, timeout=10)
    assert admin_api.status_code == 200


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": "s3cret"}])
def test_the_admin_password_and_keys_are_never_taken_for_each_other(app, proxy):
    user = create(app, "ana")
    password = {"Authorization": "Bearer s3cret"}
    assert requests.get(f"{proxy}/admin/api/keys", headers=password, timeout=10).status_code == 200
    as_key = requests.post(f"{proxy}/api/chat", json=CHAT, headers=password, timeout=10)
    assert as_key.status_code == 401  # the password is no API key
    by_user = requests.get(f"{proxy}/admin/api/keys", headers={"X-API-Key": user}, timeout=10)
    assert by_user.status_code == 401  # a user key is no admin credential
    process = requests.post(f"{proxy}/api/queue/process", json={}, headers=password, timeout=10)
    assert process.status_code == 202  # the password still runs the queue


@pytest.mark.parametrize("config", [{"API_KEYS": ["team-secret"]}])
def test_a_shared_key_is_required_and_its_holders_name_users(app, proxy):
    assert chat(proxy).status_code == 401
    assert chat(proxy, "wrong").status_code == 401
    assert chat(proxy, "team-secret", user="ana").status_code == 200
    assert "ana" in users_seen(app)


@pytest.mark.parametrize("config", [{"KEY_FAILURE_LIMIT": "3 per minute"}])
def test_guessing_keys_is_rate_limited_per_client_address(app, proxy):
    key = create(app, "ana")
    statuses = [chat(proxy, f"{KEY_PREFIX}guess{i}").status_code for i in range(4)]
    assert statuses == [401, 401, 401, 429]
    limited = chat(proxy, f"{KEY_PREFIX}guess5")
    assert int(limited.headers["Retry-After"]) >= 1
    assert chat(proxy, key).status_code == 200  # a right key is never counted


@pytest.mark.parametrize("config", [{"ALLOW_CIDRS": ["10.0.0.0/8"]}])
def test_clients_outside_the_allowed_networks_are_refused(proxy):
    refused = chat(proxy, user="ana")
    assert refused.status_code == 403 and "address" in refused.json()["error"]


@pytest.mark.parametrize("config", [{"ALLOW_CIDRS": ["127.0.0.0/8", "::1/128"]}])
def test_clients_inside_the_allowed_networks_are_served(proxy):
    assert chat(proxy, user="ana").status_code == 200


@pytest.mark.parametrize("config", [{"BACKEND_PARALLEL": 1}])
def test_sybil_a_key_rotating_x_user_id_is_still_one_user(app, proxy, fake, calls):
    """One slot, both users always backlogged: the light user gets half the grants."""
    heavy, light = create(app, "heavy"), create(app, "light")
    fake.gate = Event()
    order: list[str] = []

    def send(key: str, name: str, label: str) -> None:
        assert chat(proxy, key, user=name).status_code == 200
        order.append(label)

    first = gevent.spawn(send, heavy, "sybil-0", "heavy")  # holds the slot at the gate
    calls.wait_for("submit", 1)
    waiting = [gevent.spawn(send, heavy, f"sybil-{i}", "heavy") for i in range(1, 7)]
    waiting += [gevent.spawn(send, light, "light", "light") for _ in range(3)]
    calls.wait_for("submit", 10)
    fake.gate.set()
    gevent.joinall([first, *waiting], raise_error=True)
    served_while_both_waited = order[1:7]
    assert served_while_both_waited.count("light") == 3, order


def test_no_key_appears_in_any_log_line(app, proxy, caplog):
    caplog.set_level(logging.DEBUG)
    key = create(app, "ana")
    chat(proxy, key)
    chat(proxy, key + "x")
    with app.app_context():
        app.extensions["ollamamq.keys"].revoke(1)
    chat(proxy, key)
    assert caplog.records and not [r for r in caplog.records if key in r.getMessage()]


def test_last_use_is_written_at_most_once_a_minute(app, proxy):
    key = create(app, "ana")
    ring = app.extensions["ollamamq.keys"]
    for _ in range(3):
        assert chat(proxy, key).status_code == 200
    ring.flush_last_used(now=10_000_000_000.0)
    with app.app_context():
        first = db.session.scalars(select(ApiKey)).one().last_used_at
    assert first is not None
    chat(proxy, key)
    ring.flush_last_used(now=10_000_000_030.0)  # 30 s later: not yet written again
    with app.app_context():
        assert db.session.scalars(select(ApiKey)).one().last_used_at == first


def test_open_mode_is_as_before(app, proxy):
    assert chat(proxy, user="anyone").status_code == 200
    assert chat(proxy, "any-token").status_code == 200  # a bearer token is a fingerprint
    assert "anyone" in users_seen(app) and app.extensions["ollamamq.keys"].enforced is False


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": "s3cret"}])
def test_admin_actions_and_key_events_are_in_the_audit_trail_without_secrets(app, proxy):
    admin = {"Authorization": "Bearer s3cret"}
    made = requests.post(
        f"{proxy}/admin/api/keys", json={"user": "ana", "role": "user"}, headers=admin, timeout=10
    )
    assert made.status_code == 201
    key, key_id = made.json()["key"], made.json()["entry"]["id"]
    chat(proxy, key)
    requests.post(f"{proxy}/admin/api/users/ana/block", headers=admin, timeout=10)
    requests.post(f"{proxy}/admin/api/keys/{key_id}/revoke", headers=admin, timeout=10)
    wrong = {"Authorization": "Bearer guess"}
    assert requests.get(f"{proxy}/admin/api/keys", headers=wrong, timeout=10).status_code == 401
    requests.post(f"{proxy}/admin/login", data={"password": "guess"}, timeout=10)
    trail = requests.get(f"{proxy}/admin/api/audit", headers=admin, timeout=10).json()["events"]
    actions = [(e["action"], e["target"], e["status"]) for e in reversed(trail)]
    assert actions[:3] == [
        ("create_key", "", 201),
        ("block", "ana/block", 200),
        ("revoke_key", str(key_id), 200),
    ]
    assert trail[0]["action"] == "login" and trail[0]["status"] in (400, 401)
    assert {e["actor"] for e in trail[1:]} == {"admin password"}
    assert {e["address"] for e in trail} == {"127.0.0.1"}
    assert "user=ana" in trail[-1]["detail"]
    assert "s3cret" not in repr(trail) and key not in repr(trail) and "guess" not in repr(trail)
    page = requests.get(f"{proxy}/admin/activity", headers=admin, timeout=10)
    assert page.status_code == 200 and "revoke_key" in page.text


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": "pw"}])
def test_an_operator_blocks_an_address_under_every_user_and_key(app, proxy):
    admin = {"Authorization": "Bearer pw"}
    key = create(app, "ana")

    def block(action: str, address: str) -> requests.Response:
        url = f"{proxy}/admin/api/addresses/{action}"
        return requests.post(url, json={"address": address}, headers=admin, timeout=10)

    assert block("block", "not-an-ip").status_code == 400
    assert block("block", "127.0.0.0/8").json()["network"] == "127.0.0.0/8"
    for name in ("ana", "someone"):
        refused = chat(proxy, key, user=name)
        assert refused.status_code == 403 and "blocked" in refused.json()["error"]
    listed = requests.get(f"{proxy}/admin/api/addresses", headers=admin, timeout=10).json()
    assert listed["blocked"] == [{"network": "127.0.0.0/8", "note": ""}]
    page = requests.get(f"{proxy}/admin/users", headers=admin, timeout=10).text
    assert "127.0.0.0/8" in page and "block-address" in page
    assert block("unblock", "127.0.0.0/8").status_code == 200
    assert chat(proxy, key).status_code == 200
    assert block("unblock", "127.0.0.0/8").status_code == 404
