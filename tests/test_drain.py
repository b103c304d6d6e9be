"""SIGTERM drains: streams in flight end intact, waiting clients get 503, no download is lost."""

from __future__ import annotations

import json
import signal
import time

import gevent
import pytest
import requests
from gevent.event import Event

from tests.conftest import WAIT_LIMIT
from tests.processes import BIN, free_port, ollamamq, running

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


def until(is_done, what: str) -> None:
    """Re-ask a server in another process until `is_done()`; fail after WAIT_LIMIT."""
    with gevent.Timeout(WAIT_LIMIT, AssertionError(f"gave up waiting for {what}")):
        while not is_done():
            gevent.sleep(0.02)


def stream(url: str, first_record: Event) -> list[dict]:
    with requests.post(f"{url}/api/chat", json=CHAT, stream=True, timeout=30) as response:
        assert response.status_code == 200
        records = []
        for line in response.iter_lines():
            records.append(json.loads(line))
            first_record.set()
        return records


def waiting(url: str) -> requests.Response:
    return requests.post(f"{url}/api/chat", json={**CHAT, "stream": False}, timeout=30)


def queue_depth(url: str) -> int:
    return requests.get(f"{url}/health", timeout=10).json()["queue_depth"]


def downloads(url: str) -> dict:
    return requests.get(f"{url}/api/queue", timeout=10).json()


def commands(kind: str, port: int, fake_url: str) -> tuple[list[str], str, dict]:
    if kind == "ollamamq":
        return ollamamq(port, fake_url, "--backend-parallel", "3"), "listening on", {}
    gunicorn = [str(BIN / "gunicorn"), "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}"]
    env = {"OLLAMA_URL": fake_url, "BACKEND_PARALLEL": "3", "LOG_FILE": ""}
    return [*gunicorn, "--graceful-timeout", "60", "wsgi:app"], "Listening at", env


@pytest.mark.parametrize("kind", ["ollamamq", "gunicorn"])
def test_sigterm_drains_streams_answers_waiting_and_keeps_downloads(fake, tmp_path, kind):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command, ready, env = commands(kind, port, fake.url)
    env = {**env, "DB_PATH": str(tmp_path / "q.db"), "DRAIN_TIMEOUT": "30"}
    fake.stall, fake.pull_gate = Event(), Event()  # streams stop after their first token
    with running(command, ready, env) as server:
        requests.get(f"{url}/health", timeout=30)  # gunicorn's worker may still be booting
        requests.post(f"{url}/api/pull", json={"model": "mistral", "stream": False}, timeout=10)
        requests.post(f"{url}/api/queue/process", json={}, timeout=10)
        until(lambda: downloads(url)["downloading"], "the download to start")
        firsts = [Event() for _ in range(3)]
        streams = [gevent.spawn(stream, url, first) for first in firsts]
        assert all(first.wait(WAIT_LIMIT) for first in firsts)  # three streams in flight
        waiters = [gevent.spawn(waiting, url) for _ in range(2)]
        until(lambda: queue_depth(url) == 2, "two requests waiting")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        refused = [w.get(timeout=WAIT_LIMIT) for w in waiters]
        answered_s = time.monotonic() - signalled
        if kind == "ollamamq":  # gunicorn closes its listener at once instead
            health = requests.get(f"{url}/health", timeout=10)
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            late = waiting(url)
            assert late.status_code == 503 and late.headers["Retry-After"]
        fake.stall.set()
        records = [s.get(timeout=WAIT_LIMIT) for s in streams]
        assert server.wait(timeout=WAIT_LIMIT) == 0
        exit_s = time.monotonic() - signalled
    for response in refused:
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        assert "shutting down" in response.json()["error"]
    for stream_records in records:  # intact: every token, then the final record
        assert len(stream_records) == 9 and stream_records[-1]["done"] is True
        assert not any("error" in r for r in stream_records)
    print(
        f"{kind}: 3/3 streams complete, 2/2 waiting answered 503 in {answered_s:.2f} s, "
        f"exit 0 after {exit_s:.2f} s"
    )
    fake.pull_gate.set()
    with running(ollamamq(port, fake.url), "listening on", env):
        queue = downloads(url)
        assert [(j["model"], j["status"]) for j in queue["queue"]] == [
            ("mistral:latest", "pending")
        ]


def test_a_stream_past_the_drain_timeout_ends_with_an_error_record(fake, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"DB_PATH": str(tmp_path / "q.db")}
    fake.stall = Event()  # never set: the stream would run forever
    with running(ollamamq(port, fake.url, "--drain-timeout", "0.5"), "listening on", env) as server:
        first = Event()
        streamed = gevent.spawn(stream, url, first)
        assert first.wait(WAIT_LIMIT)
        server.send_signal(signal.SIGTERM)
        records = streamed.get(timeout=WAIT_LIMIT)
        assert server.wait(timeout=WAIT_LIMIT) == 0
    assert "error" in records[-1] and not records[-1].get("done")


def test_a_second_signal_exits_at_once(fake, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"DB_PATH": str(tmp_path / "q.db")}
    fake.stall = Event()  # never set: the drain would wait its full 60 s
    with running(ollamamq(port, fake.url), "listening on", env) as server:
        first = Event()
        streamed = gevent.spawn(stream, url, first)
        assert first.wait(WAIT_LIMIT)
        server.send_signal(signal.SIGTERM)
        until(lambda: requests.get(f"{url}/health", timeout=10).status_code == 503, "draining")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=WAIT_LIMIT) == 1
    streamed.kill()
