"""Bad input, full queues, dead backends and vanished clients: a clear error, nothing leaked."""

from __future__ import annotations

import json
import socket

import gevent
import pytest
import requests
from gevent.event import Event

from ollamamq import create_app
from tests.conftest import served, settings, wait_arrivals

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def assert_still_serves(url: str, app) -> None:
    """The next request is answered and no slot is left taken."""
    response = requests.post(f"{url}/api/chat", json=CHAT, timeout=10)
    assert response.status_code == 200, response.text
    dispatcher = app.extensions["ollamamq"]
    assert dispatcher.active_count == 0 and dispatcher.waiting_count == 0
    assert all(b.active == 0 for b in dispatcher.pool)


def raw_request(url: str, path: str, body: dict, user: str) -> socket.socket:
    """Send a request on a bare socket, so the test decides when the client hangs up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nX-User-ID: {user}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": []}', "model is required"),
    ],
)
def test_bad_body_is_a_400_with_a_json_error(proxy, app, body, message):
    response = requests.post(f"{proxy}/api/chat", data=body, timeout=10)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert_still_serves(proxy, app)


def test_unknown_model_is_a_404_before_queueing(proxy, app, fake):
    response = requests.post(f"{proxy}/api/chat", json={**CHAT, "model": "nope"}, timeout=10)
    assert response.status_code == 404
    assert "nope" in response.json()["error"]
    assert not [r for r in fake.received if r.path == "/api/chat"]


def test_openai_errors_use_openai_shape(proxy):
    response = requests.post(f"{proxy}/v1/chat/completions", data=b"{", timeout=10)
    assert response.status_code == 400
    assert "invalid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize("config", [{"MAX_CONTENT_LENGTH": 1000}])
def test_oversized_body_is_a_413(proxy, app):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    response = requests.post(f"{proxy}/api/chat", json=body, timeout=10)
    assert response.status_code == 413
    assert "too large" in response.json()["error"]
    assert_still_serves(proxy, app)


@pytest.mark.parametrize("config", [{"MAX_QUEUE_PER_USER": 2, "MAX_QUEUE": 3}])
def test_full_queues_answer_429_then_503_with_retry_after(proxy, app, fake, calls):
    fake.gate = Event()
    held = []
    for n, user in enumerate(("a", "a", "a", "b"), start=1):
        headers = {"X-User-ID": user}
        held.append(gevent.spawn(requests.post, f"{proxy}/api/chat", json=CHAT, headers=headers))
        calls.wait_for("submit", n)
        wait_arrivals(fake, "/api/chat", 1)  # a: 1 active + 2 waiting; b: 1 waiting
    own = requests.post(f"{proxy}/api/chat", json=CHAT, headers={"X-User-ID": "a"}, timeout=10)
    assert own.status_code == 429 and int(own.headers["Retry-After"]) >= 1
    assert "already has 2" in own.json()["error"]
    everyone = requests.post(f"{proxy}/api/chat", json=CHAT, headers={"X-User-ID": "c"}, timeout=10)
    assert everyone.status_code == 503 and int(everyone.headers["Retry-After"]) >= 1
    fake.gate.set()
    gevent.joinall(held, raise_error=True)
    assert [job.value.status_code for job in held] == [200] * 4
    assert_still_serves(proxy, app)


def test_unreachable_backend_is_a_502_and_recovers(fake):
    port = int(fake.url.rsplit(":", 1)[1])
    fake.stop()
    app = create_app(settings([fake.url]))
    with served(app) as url:
        response = requests.post(f"{url}/api/chat", json=CHAT, timeout=10)
        assert response.status_code == 502
        assert "unreachable" in response.json()["error"]
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "degraded"
        fake.start(port)
        assert_still_serves(url, app)


@pytest.mark.parametrize("config", [{"TIMEOUT": 0.3}])
def test_silent_backend_is_a_504_before_the_first_byte(proxy, app, fake):
    fake.gate = Event()  # never opened: the backend says nothing
    response = requests.post(f"{proxy}/api/chat", json=CHAT, timeout=10)
    assert response.status_code == 504
    assert "did not answer" in response.json()["error"]
    fake.gate.set()
    assert_still_serves(proxy, app)


@pytest.mark.parametrize("config", [{"TIMEOUT": 0.3}])
def test_backend_silent_mid_stream_ends_with_an_error_record(proxy, app, fake):
    fake.stall = Event()  # the backend stops after its first token
    with requests.post(f"{proxy}/api/chat", json={**CHAT, "stream": True}, timeout=10) as r:
        records = [json.loads(line) for line in r.iter_lines()]
    assert r.status_code == 200
    assert records[0]["message"]["content"] == "tok0 "
    assert "error" in records[-1] and "done" not in records[-1]
    fake.stall.set()
    assert_still_serves(proxy, app)


@pytest.mark.parametrize("config", [{"TIMEOUT": 0.3}])
def test_openai_stream_silent_mid_stream_ends_with_an_sse_error(proxy, app, fake):
    fake.stall = Event()
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with requests.post(f"{proxy}/v1/chat/completions", json=body, timeout=10) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[0].startswith(b"data: {")
    assert json.loads(events[-1].removeprefix(b"data: "))["error"]["message"]
    fake.stall.set()
    assert_still_serves(proxy, app)


def test_client_leaving_while_queued_never_reaches_the_backend(proxy, app, fake, calls):
    fake.gate = Event()
    holder = gevent.spawn(requests.post, f"{proxy}/api/chat", json=CHAT, timeout=10)
    calls.wait_for("submit", 1)
    body = {**CHAT, "messages": [{"role": "user", "content": "I will leave"}]}
    sock = raw_request(proxy, "/api/chat", body, "leaver")
    calls.wait_for("submit", 2)
    sock.close()
    calls.wait_for("abandon", 1)
    assert app.extensions["ollamamq"].waiting_count == 0
    fake.gate.set()
    assert holder.get().status_code == 200
    contents = [r.json["messages"][0]["content"] for r in fake.received if r.path == "/api/chat"]
    assert "I will leave" not in contents
    assert_still_serves(proxy, app)


def test_client_leaving_mid_stream_frees_the_slot_at_once(proxy, app, fake, calls):
    fake.tokens, fake.token_delay = 1000, 0.05  # a 50 s stream
    sock = raw_request(proxy, "/api/chat", {**CHAT, "stream": True}, "leaver")
    assert b"tok0" in sock.recv(65536)
    sock.close()
    calls.wait_for("release", 1)  # long before the stream would have ended
    chat = next(r for r in fake.received if r.path == "/api/chat")
    assert chat.ended.wait(5)  # the backend notices its closed connection on its next write
    assert chat.disconnected
    fake.tokens, fake.token_delay = 4, 0
    assert_still_serves(proxy, app)


def test_backend_errors_are_relayed_with_their_status(proxy, fake):
    fake.models.pop("llama3:latest")  # the backend lost it after our last health check
    response = requests.post(f"{proxy}/api/chat", json=CHAT, timeout=10)
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


def test_hop_by_hop_headers_stay_behind_and_end_to_end_ones_pass(proxy, fake):
    headers = {"X-Custom": "yes", "Connection": "keep-alive, X-Secret", "X-Secret": "no"}
    response = requests.post(f"{proxy}/api/chat", json=CHAT, headers=headers, timeout=10)
    assert response.status_code == 200 and "X-Queue-Wait-Ms" in response.headers
    sent = fake.received[-1].headers
    assert sent["X-Custom"] == "yes"
    assert "X-Secret" not in sent


def test_client_leaving_during_a_non_streamed_generation_frees_the_slot_at_once(
    proxy, app, fake, calls
):
    """Ollama sends nothing of a non-streamed answer until it is generated: the proxy must
    not wait for it to notice the client has gone."""
    fake.tokens, fake.token_delay = 1000, 0.05  # a 50 s generation, its headers at the end
    sock = raw_request(proxy, "/api/chat", CHAT, "leaver")
    wait_arrivals(fake, "/api/chat", 1)
    sock.close()
    calls.wait_for("release", 1)  # long before the answer would have begun
    chat = next(r for r in fake.received if r.path == "/api/chat")
    assert chat.ended.wait(5) and chat.disconnected  # the backend's call was closed
    assert app.extensions["ollamamq"].users["leaver"].cancelled == 1
    fake.tokens, fake.token_delay = 4, 0
    assert_still_serves(proxy, app)


def test_a_whole_answer_goes_out_with_its_length(proxy, fake):
    response = requests.post(f"{proxy}/api/chat", json=CHAT, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(response.content))
    assert "Transfer-Encoding" not in response.headers
    assert response.json()["done"] is True
