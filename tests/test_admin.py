"""The admin dashboard: login, CSRF, pages, fragments, the JSON API and every action."""

from __future__ import annotations

import re
from collections.abc import Iterator

import gevent
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from gevent.event import Event

from ollamamq.formats import duration, millis, number, size
from ollamamq.views import bars, masked
from tests.conftest import WAIT_LIMIT

PASSWORD = "s3cret pass"
WITH_PASSWORD = pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD}])
PAGES = ["/admin/", "/admin/users", "/admin/queue", "/admin/downloads", "/admin/settings"]
FRAGMENTS = [f"/admin/fragment/{name}" for name in ("overview", "users", "queue", "downloads")]
API = [f"/admin/api/{name}" for name in ("overview", "users", "queue", "downloads", "settings")]
BEARER = {"Authorization": f"Bearer {PASSWORD}"}
OUTSIDER = {"REMOTE_ADDR": "10.1.2.3"}


@pytest.fixture
def client(app: Flask, proxy: str) -> FlaskClient:
    """A browser-like client of the served app (services started, schema migrated)."""
    return app.test_client()


def token_of(client: FlaskClient, path: str = "/admin/login") -> str:
    """The CSRF token a page carries in its <meta>."""
    html = client.get(path).get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


def log_in(client: FlaskClient) -> str:
    """Log in through the form; the session's new CSRF token."""
    response = client.post(
        "/admin/login", data={"password": PASSWORD, "csrf_token": token_of(client)}
    )
    assert response.status_code == 302
    return token_of(client, "/admin/")


def api(client: FlaskClient, path: str) -> dict:
    """A GET of the JSON API with the Bearer password."""
    return client.get(f"/admin/api/{path}", headers=BEARER).json


def users_of(client: FlaskClient) -> dict[str, dict]:
    """The users JSON, by name."""
    return {u["user"]: u for u in api(client, "users")["users"]}


def chat(url: str, user: str) -> requests.Response:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return requests.post(f"{url}/api/chat", json=body, headers={"X-User-ID": user}, timeout=10)


class Stream:
    """A streamed chat read in its own greenlet; `started` is set by its first bytes."""

    def __init__(self, url: str, user: str) -> None:
        self.started = Event()
        self.greenlet = gevent.spawn(self._read, url, user)

    def _read(self, url: str, user: str) -> int:
        body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"X-User-ID": user}
        with requests.post(
            f"{url}/api/chat", json=body, headers=headers, stream=True, timeout=10
        ) as response:
            for _ in response.iter_content(chunk_size=None):
                self.started.set()
            return response.status_code

    def status(self) -> int:
        return self.greenlet.get(timeout=WAIT_LIMIT)


@pytest.fixture
def stalled(fake) -> Iterator[Event]:
    """Generations hold after their first token until the test sets this."""
    fake.stall = Event()
    yield fake.stall
    fake.stall.set()


# -- access -----------------------------------------------------------------------------------


@WITH_PASSWORD
def test_anonymous_browsers_are_sent_to_the_login_page(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 302
        assert response.location.startswith("/admin/login?next=/admin/")


@WITH_PASSWORD
def test_anonymous_api_fragment_and_action_calls_get_401(client):
    for path in API + FRAGMENTS:
        response = client.get(path)
        assert response.status_code == 401 and "Bearer" in response.json["error"]
    assert client.post("/admin/api/downloads/process").status_code == 401
    assert client.post("/admin/api/users/alice/block").status_code == 401


@WITH_PASSWORD
def test_wrong_password_is_rejected_and_the_right_one_logs_in(client):
    wrong = client.post("/admin/login", data={"password": "nope", "csrf_token": token_of(client)})
    assert wrong.status_code == 401 and "Wrong password" in wrong.get_data(as_text=True)
    assert client.get("/admin/").status_code == 302
    token = token_of(client, "/admin/login?next=/admin/queue")
    right = client.post(
        "/admin/login?next=/admin/queue", data={"password": PASSWORD, "csrf_token": token}
    )
    assert right.status_code == 302 and right.location == "/admin/queue"
    cookie = right.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert client.get("/admin/queue").status_code == 200
    assert client.get("/admin/login").status_code == 302  # already in: back to the dashboard


@WITH_PASSWORD
def test_login_never_redirects_outside_the_admin(client):
    for target in ("http://evil.example/admin", "//evil.example/admin", "/api/tags"):
        token = token_of(client)
        data = {"password": PASSWORD, "csrf_token": token}
        response = client.post("/admin/login", query_string={"next": target}, data=data)
        assert response.location == "/admin/"
        client.post("/admin/logout", data={"csrf_token": token_of(client, "/admin/")})


@WITH_PASSWORD
def test_posts_without_the_csrf_token_get_400(client):
    token_of(client)  # a session cookie, but no token in the form
    login = client.post("/admin/login", data={"password": PASSWORD})
    assert login.status_code == 400 and "CSRF" in login.get_data(as_text=True)
    token = log_in(client)
    missing = client.post("/admin/api/downloads/process")
    assert missing.status_code == 400 and "CSRF" in missing.json["error"]
    forged = client.post("/admin/api/downloads/process", headers={"X-CSRFToken": "forged"})
    assert forged.status_code == 400
    assert client.post("/admin/logout").status_code == 400
    ok = client.post("/admin/api/downloads/process", headers={"X-CSRFToken": token})
    assert ok.status_code == 202


@WITH_PASSWORD
def test_the_bearer_password_opens_the_api_without_csrf(client):
    for path in API:
        assert client.get(path, headers=BEARER).status_code == 200
    wrong = client.get("/admin/api/overview", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.post("/admin/api/downloads/process", headers=BEARER).status_code == 202
    assert client.get("/admin/", headers=BEARER).status_code == 200


@WITH_PASSWORD
def test_logging_out_ends_the_session(client):
    token = log_in(client)
    response = client.post("/admin/logout", data={"csrf_token": token})
    assert response.status_code == 302 and response.location == "/admin/login"
    assert client.get("/admin/").status_code == 302
    assert client.get("/admin/api/overview").status_code == 401


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD, "ADMIN_LOGIN_LIMIT": "3/minute"}])
def test_wrong_passwords_are_limited_per_client_address(client, app):
    for _ in range(3):
        data = {"password": "guess", "csrf_token": token_of(client)}
        assert client.post("/admin/login", data=data).status_code == 401
    data = {"password": PASSWORD, "csrf_token": token_of(client)}
    limited = client.post("/admin/login", data=data)
    assert limited.status_code == 429 and "Too many login attempts" in limited.text
    assert int(limited.headers["Retry-After"]) > 0
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "127.0.0.2"
    assert log_in(other)  # another address still gets in


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD, "ADMIN_LOGIN_LIMIT": "2/minute"}])
def test_wrong_bearer_passwords_are_limited_too(client):
    guess = {"Authorization": "Bearer guess"}
    codes = [client.get("/admin/api/users", headers=guess).status_code for _ in range(3)]
    assert codes == [401, 401, 429]


@WITH_PASSWORD
def test_right_passwords_cost_no_attempts(client, app):
    for _ in range(8):
        assert client.get("/admin/api/overview", headers=BEARER).status_code == 200
        log_in(app.test_client())


def test_without_a_password_loopback_gets_in_and_is_told_why(client):
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200
        assert "No admin password:</strong> reachable only from this machine" in page.text
    assert client.get("/admin/login").status_code == 302
    for path in API + FRAGMENTS:
        assert client.get(path).status_code == 200


def test_without_a_password_other_machines_get_403(app, proxy):
    outsider = app.test_client()
    outsider.environ_base.update(OUTSIDER)
    for path in [*PAGES, "/admin/login"]:
        page = outsider.get(path)
        assert page.status_code == 403 and "OLLAMAMQ_ADMIN_PASSWORD" in page.text
    for path in API + FRAGMENTS:
        assert outsider.get(path).status_code == 403
    assert outsider.get("/admin/api/users", headers=BEARER).status_code == 403


def test_without_a_password_loopback_posts_still_need_the_csrf_token(client):
    """Another site's page in the operator's browser must not drive the admin."""
    assert client.post("/admin/api/downloads/process").status_code == 400
    token = token_of(client, "/admin/")
    assert (
        client.post("/admin/api/downloads/process", headers={"X-CSRFToken": token}).status_code
        == 202
    )


@WITH_PASSWORD
def test_the_proxy_endpoints_never_ask_for_csrf(client, proxy):
    log_in(client)
    session = requests.Session()
    session.cookies.set("ollamamq_admin", client.get_cookie("ollamamq_admin").value)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert session.post(f"{proxy}/api/chat", json=body, timeout=10).status_code == 200
    assert session.post(f"{proxy}/v1/chat/completions", json=body, timeout=10).status_code == 200
    pull = session.post(f"{proxy}/api/pull", json={"model": "mistral", "stream": False}, timeout=10)
    assert pull.json()["status"] == "queued"
    session.close()


# -- pages and fragments ----------------------------------------------------------------------


@WITH_PASSWORD
def test_every_page_and_fragment_renders(client, proxy):
    chat(proxy, "alice")
    requests.post(f"{proxy}/api/pull", json={"model": "mistral", "stream": False}, timeout=10)
    log_in(client)
    titles = {"/admin/": "Overview", "/admin/users": "Users", "/admin/queue": "Queue"}
    titles |= {"/admin/downloads": "Downloads", "/admin/settings": "Settings"}
    for path, title in titles.items():
        page = client.get(path)
        assert page.status_code == 200 and f"<h1>{title}</h1>" in page.text
        assert "No admin password" not in page.text and "Log out" in page.text
        assert page.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert 'data-user="alice"' in client.get("/admin/fragment/users").text
    assert "mistral:latest" in client.get("/admin/fragment/downloads").text
    assert "Requests per minute" in client.get("/admin/fragment/overview").text
    assert "Nothing is streaming" in client.get("/admin/fragment/queue").text
    missing = client.get("/admin/fragment/nope")
    assert missing.status_code == 404 and "<h1>404</h1>" in missing.text


@WITH_PASSWORD
def test_the_users_page_sorts_by_the_chosen_column(client, proxy, fake):
    chat(proxy, "zed")
    fake.tokens = 20
    chat(proxy, "amy")
    log_in(client)
    by_name = client.get("/admin/fragment/users").text
    assert by_name.index('data-user="amy"') < by_name.index('data-user="zed"')
    by_tokens = client.get("/admin/fragment/users?sort=tokens_out&order=asc").text
    assert by_tokens.index('data-user="zed"') < by_tokens.index('data-user="amy"')
    assert 'href="?sort=tokens_out&amp;order=desc"' in by_tokens  # a second click flips it


# -- the JSON API -----------------------------------------------------------------------------


@WITH_PASSWORD
def test_overview_json(client, proxy):
    assert chat(proxy, "alice").status_code == 200
    data = api(client, "overview")
    assert set(data) == {"version", "uptime_s", "fairness", "totals", "backends", "throughput"}
    assert data["totals"] == {"waiting": 0, "active": 0, "served": 1, "errors": 0}
    assert data["version"] == "0.1.0" and data["uptime_s"] >= 0
    (backend,) = data["backends"]
    assert set(backend) == {
        "name",
        "url",
        "up",
        "latency_ms",
        "active",
        "slots",
        "models",
        "loaded",
        "running",
        "error",
    }
    assert backend["up"] is True and "llama3:latest" in backend["models"]
    minutes = data["throughput"]
    assert len(minutes) == 60 and all(m["minute"].endswith(":00Z") for m in minutes)
    assert minutes == sorted(minutes, key=lambda m: m["minute"])
    assert minutes[-1]["requests"] == 1 and minutes[-1]["tokens"] > 0


@WITH_PASSWORD
def test_users_json_lists_every_user_with_their_tokens(client, proxy, fake):
    chat(proxy, "alice")
    fake.tokens = 30
    chat(proxy, "bob")
    users = api(client, "users?sort=tokens_out&order=desc")["users"]
    assert [u["user"] for u in users] == ["bob", "alice"]
    bob = users[0]
    assert set(bob) == {
        "user",
        "waiting",
        "active",
        "served",
        "errors",
        "cancelled",
        "tokens_in",
        "tokens_out",
        "avg_wait_ms",
        "p95_wait_ms",
        "last_seen",
        "blocked",
        "vip",
        "weight",
        "service",
        "budget",
    }
    assert (bob["served"], bob["tokens_out"], bob["blocked"]) == (1, 30, False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", bob["last_seen"])


@WITH_PASSWORD
def test_queue_json_shows_the_waiting_line_and_the_streams(client, proxy, calls, stalled):
    alice = Stream(proxy, "alice")
    assert alice.started.wait(WAIT_LIMIT)
    bobs = [Stream(proxy, "bob") for _ in range(2)]
    calls.wait_for("submit", 3)
    queue = api(client, "queue")
    (active,) = queue["active"]
    assert (active["user"], active["model"]) == ("alice", "llama3:latest")
    assert active["path"] == "/api/chat"
    assert active["tokens"] >= 1 and active["backend"] and active["seconds"] >= 0
    assert [(w["user"], w["position"]) for w in queue["waiting"]] == [("bob", 1), ("bob", 2)]
    assert set(queue["waiting"][0]) == {"id", "user", "model", "path", "seconds", "position"}
    stalled.set()
    assert [s.status() for s in [alice, *bobs]] == [200, 200, 200]


@WITH_PASSWORD
def test_cancelling_a_waiting_request(client, proxy, calls, stalled):
    alice = Stream(proxy, "alice")
    assert alice.started.wait(WAIT_LIMIT)
    bob = Stream(proxy, "bob")
    calls.wait_for("submit", 2)
    queue = api(client, "queue")
    waiting, active = queue["waiting"][0]["id"], queue["active"][0]["id"]
    done = client.post(f"/admin/api/queue/{waiting}/cancel", headers=BEARER)
    assert done.status_code == 200 and done.json["status"] == "ok"
    assert bob.status() == 410
    assert client.post(f"/admin/api/queue/{waiting}/cancel", headers=BEARER).status_code == 404
    assert client.post(f"/admin/api/queue/{active}/cancel", headers=BEARER).status_code == 404
    stalled.set()
    assert alice.status() == 200
    assert users_of(client)["bob"]["cancelled"] == 1


@WITH_PASSWORD
def test_blocking_and_unblocking_a_user(client, proxy):
    assert client.post("/admin/api/users/alice/block", headers=BEARER).status_code == 404
    assert chat(proxy, "alice").status_code == 200
    assert chat(proxy, "team/ana").status_code == 200
    blocked = client.post("/admin/api/users/alice/block", headers=BEARER)
    assert blocked.status_code == 200 and blocked.json["blocked"] is True
    assert chat(proxy, "alice").status_code == 403
    assert client.post("/admin/api/users/team/ana/block", headers=BEARER).json["user"] == "team/ana"
    assert {name: u["blocked"] for name, u in users_of(client).items()} == {
        "alice": True,
        "team/ana": True,
    }
    assert client.post("/admin/api/users/alice/unblock", headers=BEARER).json["blocked"] is False
    assert chat(proxy, "alice").status_code == 200


@WITH_PASSWORD
def test_setting_a_users_weight_and_vip_flag(client, app):
    settings = client.post(
        "/admin/api/users/ana/settings", headers=BEARER, json={"weight": 2, "vip": True}
    )
    assert settings.status_code == 200 and (settings.json["weight"], settings.json["vip"]) == (
        2.0,
        True,
    )
    assert (users_of(client)["ana"]["weight"], users_of(client)["ana"]["vip"]) == (2.0, True)
    refused = client.post("/admin/api/users/ana/settings", headers=BEARER, json={"weight": -1})
    assert refused.status_code == 400 and "positive" in refused.json["error"]
    unknown = client.post("/admin/api/users/ana/settings", headers=BEARER, json={"colour": 1})
    assert unknown.status_code == 400


@WITH_PASSWORD
def test_a_plain_form_post_goes_back_to_its_page(client, proxy):
    chat(proxy, "alice")
    token = log_in(client)
    data = {"csrf_token": token}
    back = client.post(
        "/admin/api/users/alice/block",
        data=data,
        headers={"Referer": "http://localhost/admin/users?sort=served"},
    )
    assert back.status_code == 303 and back.location == "/admin/users?sort=served"
    elsewhere = client.post(
        "/admin/api/users/alice/unblock",
        data=data,
        headers={"Referer": "http://evil.example/admin/x"},
    )
    assert elsewhere.status_code == 303 and elsewhere.location == "/admin/"


@WITH_PASSWORD
def test_downloads_json_and_its_actions(client, app, proxy):
    for model in ("mistral", "phi3"):
        requests.post(f"{proxy}/api/pull", json={"model": model, "stream": False}, timeout=10)
    data = api(client, "downloads")
    assert set(data) == {"jobs", "counts", "next_run", "processing", "window_open"}
    assert data["counts"] == {"pending": 2} and data["next_run"].endswith("Z")
    assert [(j["id"], j["status"], j["position"]) for j in data["jobs"]] == [
        (1, "pending", 1),
        (2, "pending", 2),
    ]

    def act(job: int | str, action: str) -> int:
        return client.post(f"/admin/api/downloads/{job}/{action}", headers=BEARER).status_code

    assert act(1, "process") == 200
    app.extensions["ollamamq.pulls"].wait()
    jobs = {j["id"]: j for j in api(client, "downloads")["jobs"]}
    assert (jobs[1]["status"], jobs[1]["percent"], jobs[2]["status"]) == (
        "completed",
        100.0,
        "pending",
    )
    assert [act(1, "process"), act(1, "cancel"), act(1, "retry")] == [409, 409, 409]
    assert [act(2, "cancel"), act(2, "cancel"), act(2, "process")] == [200, 409, 409]
    assert act(2, "retry") == 200
    assert [act(2, "remove"), act(2, "remove"), act(99, "retry")] == [200, 404, 404]
    assert act(1, "remove") == 200
    body = {"model": "gemma2", "stream": False}
    job = requests.post(f"{proxy}/api/pull", json=body, timeout=10).json()["job"]
    everything = client.post("/admin/api/downloads/process", headers=BEARER)
    assert everything.status_code == 202 and everything.json["jobs"] == [job]
    app.extensions["ollamamq.pulls"].wait()
    assert api(client, "downloads")["counts"] == {"completed": 1}


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD, "SECRET_KEY": "signing-key-1234"}])
def test_settings_show_the_configuration_with_secrets_masked(client, app):
    app.config["RATELIMIT_STORAGE_URI"] = "redis://ops:hunter2@cache:6379/0"
    response = client.get("/admin/api/settings", headers=BEARER)
    settings = response.json["settings"]
    assert settings["ADMIN_PASSWORD"] == settings["SECRET_KEY"] == "********"
    assert settings["RATELIMIT_STORAGE_URI"] == "redis://ops:********@cache:6379/0"
    assert settings["MAX_QUEUE"] == 10_000 and settings["OLLAMA_URLS"] == app.config["OLLAMA_URLS"]
    for secret in (PASSWORD, "signing-key-1234", "hunter2"):
        assert secret not in response.text
    log_in(client)
    page = client.get("/admin/settings").text
    assert "redis://ops:********@cache:6379/0" in page and "hunter2" not in page


def test_masking_hides_url_passwords_and_secret_names():
    url = "postgresql://app:pa55@db.internal:5432/ollamamq"
    assert (
        masked("SQLALCHEMY_DATABASE_URI", url)
        == "postgresql://app:********@db.internal:5432/ollamamq"
    )
    assert masked("OLLAMA_URLS", ["http://u:p@gpu:11434", "http://gpu2:11434"]) == [
        "http://u:********@gpu:11434",
        "http://gpu2:11434",
    ]
    assert masked("ADMIN_PASSWORD", "") == ""  # nothing set, nothing to hide
    assert masked("SECRET_KEY", "abc") == "********"
    assert masked("PORT", 11435) == 11435


def test_numbers_read_as_people_write_them():
    assert [duration(4.25), duration(185), duration(7380), duration(277200)] == [
        "4.2 s",
        "3 min 05 s",
        "2 h 03 min",
        "3 d 5 h",
    ]
    assert [millis(230.4), millis(1800), millis(None)] == ["230 ms", "1.8 s", "—"]
    assert [size(0), size(512), size(4_661_224_676)] == ["0 B", "512 B", "4.7 GB"]
    assert number(2_400_000) == "2,400,000"


def test_chart_bars_scale_to_the_peak():
    points = [{"minute": "2026-01-01T10:00:00Z", "requests": n} for n in (0, 5, 10)]
    chart = bars(points, "requests", width=300, height=100)
    assert (chart["peak"], chart["total"]) == (10, 15)
    assert [b["h"] for b in chart["bars"]] == [0, 50.0, 100.0]
    assert chart["bars"][2]["y"] == 0 and chart["bars"][1]["title"] == "10:00 UTC: 5"
