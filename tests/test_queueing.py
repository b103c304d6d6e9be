"""Fair per-user queueing through a served proxy, one backend slot unless said otherwise."""

from __future__ import annotations

import itertools
import json

import gevent
import pytest
import requests
from gevent.event import Event

from ollamamq.backends import BackendPool
from ollamamq.dispatcher import Dispatcher
from ollamamq.fairshare import FairQueue
from ollamamq.ticket import ACTIVE, WAITING
from tests.conftest import Calls, wait_arrivals
from tests.fake_ollama import FakeOllama


def chat(url: str, user: str, text: str, stream: bool = False) -> requests.Response:
    body = {"model": "llama3", "messages": [{"role": "user", "content": text}], "stream": stream}
    headers = {"X-User-ID": user}
    return requests.post(f"{url}/api/chat", json=body, headers=headers, stream=stream, timeout=10)


def backend_order(fake: FakeOllama) -> list[str]:
    """The prompts of the chats the backend received, in arrival order."""
    return [r.json["messages"][0]["content"] for r in fake.received if r.path == "/api/chat"]


def queue_behind_gate(fake: FakeOllama, calls: Calls, proxy: str, requests_: list[tuple[str, str]]):
    """Send requests in this order while the backend is held, so all of them queue."""
    fake.gate = Event()
    jobs = []
    for n, (user, text) in enumerate(requests_, start=1):
        jobs.append(gevent.spawn(chat, proxy, user, text))
        calls.wait_for("submit", n)
    return jobs


def test_light_user_is_served_second_and_fourth_not_last(fake, calls, proxy):
    order = [("a", f"a{i}") for i in range(6)] + [("b", "b0"), ("b", "b1")]
    jobs = queue_behind_gate(fake, calls, proxy, order)
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    assert all(job.value.status_code == 200 for job in jobs)
    assert backend_order(fake) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_each_users_requests_keep_their_order(fake, calls, proxy):
    order = [(u, f"{u}{i}") for i in range(4) for u in ("a", "b", "c")]
    jobs = queue_behind_gate(fake, calls, proxy, order)
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    seen = backend_order(fake)
    for user in "abc":
        assert [t for t in seen if t[0] == user] == [f"{user}{i}" for i in range(4)]


def test_backend_never_sees_more_requests_than_slots(fake, calls, proxy):
    jobs = queue_behind_gate(fake, calls, proxy, [(f"u{i}", str(i)) for i in range(6)])
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    assert fake.max_active == 1


@pytest.mark.parametrize("config", [{"BACKEND_PARALLEL": 3}])
def test_parallel_slots_are_all_used_and_never_exceeded(fake, calls, proxy, app):
    jobs = queue_behind_gate(fake, calls, proxy, [(f"u{i}", str(i)) for i in range(7)])
    wait_arrivals(fake, "/api/chat", 3)
    dispatcher = app.extensions["ollamamq"]
    assert (dispatcher.active_count, dispatcher.waiting_count) == (3, 4)
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    assert fake.max_active == 3


def test_queue_wait_is_reported_in_a_header(fake, calls, proxy):
    jobs = queue_behind_gate(fake, calls, proxy, [("a", "first"), ("b", "second")])
    gevent.sleep(0.05)  # a measurable wait for the second request, not a race guard
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    assert float(jobs[1].value.headers["X-Queue-Wait-Ms"]) >= 50
    assert float(jobs[0].value.headers["X-Queue-Wait-Ms"]) < 50


def test_first_chunk_arrives_before_the_backend_has_finished(fake, proxy):
    fake.tokens, fake.token_delay = 20, 0.05
    with chat(proxy, "a", "stream please", stream=True) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert first["message"]["content"] == "tok0 "
        assert fake.received[-1].finished is None  # still producing tokens
        records = [json.loads(line) for line in lines]
    assert records[-1]["done"] is True and records[-1]["eval_count"] == 20


def test_records_are_relayed_unchanged(fake, proxy):
    body = {"model": "llama3", "prompt": "hello there", "stream": True}
    direct = requests.post(f"{fake.url}/api/generate", json=body, timeout=10)
    relayed = requests.post(f"{proxy}/api/generate", json=body, timeout=10)
    volatile = {
        "created_at",
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    }

    def stable(response):
        records = [json.loads(line) for line in response.content.splitlines()]
        return [{k: v for k, v in r.items() if k not in volatile} for r in records]

    assert (
        relayed.headers["Content-Type"] == direct.headers["Content-Type"] == "application/x-ndjson"
    )
    assert stable(relayed) == stable(direct)


def test_metadata_calls_never_wait_behind_a_generation(fake, calls, proxy):
    jobs = queue_behind_gate(fake, calls, proxy, [("a", "held"), ("b", "waiting")])
    assert requests.get(f"{proxy}/api/tags", timeout=10).status_code == 200
    assert requests.get(f"{proxy}/v1/models", timeout=10).status_code == 200
    assert requests.post(f"{proxy}/api/show", json={"model": "llama3"}, timeout=10).ok
    health = requests.get(f"{proxy}/health", timeout=10).json()
    assert (health["active"], health["queue_depth"]) == (1, 1)
    assert health["backends"][0]["up"] and health["backends"][0]["latency_ms"] is not None
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)


# -- fair charging: a stream pays for what it used ----------------------------------------------


def openai_chat(url: str, user: str, tokens: int) -> requests.Response:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "answer"}]}
    body |= {"stream": True, "max_tokens": tokens}
    headers = {"X-User-ID": user}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def stall_again(fake: FakeOllama) -> None:
    """Let the stalled generation go on; the next one stalls at the same token."""
    held, fake.stall = fake.stall, Event()
    held.set()


def test_a_client_that_hangs_up_near_the_end_pays_for_what_it_read(fake, calls, proxy, app):
    """One slot, both users backlogged: the aborter reads 19 of 20 records and hangs up."""
    fake.tokens, fake.stall, fake.stall_after = 20, Event(), 19
    read = {"honest": 0, "aborter": 0}

    def honest():
        with chat(proxy, "honest", "hello", stream=True) as response:
            read["honest"] += sum(1 for line in response.iter_lines() if b'"done":false' in line)

    def aborter():
        with chat(proxy, "aborter", "hello", stream=True) as response:
            lines = response.iter_lines()
            read["aborter"] += sum(1 for _ in itertools.islice(lines, 19))

    jobs = [gevent.spawn(f) for _ in range(8) for f in (honest, aborter)]
    calls.wait_for("submit", len(jobs))
    served_by = []
    for grant in range(1, 11):
        wait_arrivals(fake, "/api/chat", grant)
        served_by.append(fake.received[-1].headers["X-User-Id"])
        if served_by[-1] == "honest":
            stall_again(fake)  # it reads to the end
        calls.wait_for("release", grant)
        if served_by[-1] == "aborter":
            stall_again(fake)  # the cut generation may end
    service = {
        u: 20 * served_by.count(u) if u == "honest" else 19 * served_by.count(u) for u in read
    }
    assert service["honest"] / sum(service.values()) >= 0.45
    stats = app.extensions["ollamamq"].users["aborter"]
    assert stats.tokens_out == 19 * served_by.count("aborter")  # the admin counts it too
    fake.stall.set()
    fake.stall = None
    gevent.joinall(jobs, raise_error=True)


def test_a_backend_without_streamed_usage_is_charged_by_records(fake, calls, proxy):
    """llama.cpp-style streams: heavy (200 tokens) and light (20) still share token service."""
    fake.stream_usage, fake.gate = False, Event()
    jobs = [gevent.spawn(openai_chat, proxy, "heavy", 200) for _ in range(8)]
    jobs += [gevent.spawn(openai_chat, proxy, "light", 20) for _ in range(45)]
    calls.wait_for("submit", len(jobs))
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)
    chats = [r for r in fake.received if r.path == "/v1/chat/completions"][:44]
    service = {
        u: sum(r.json["max_tokens"] for r in chats if r.headers["X-User-Id"] == u)
        for u in ("heavy", "light")
    }
    assert jain(list(service.values())) >= 0.95
    assert all(b"usage" not in job.value.content for job in jobs)


@pytest.mark.parametrize("config", [{"TIMEOUT": 0.3}])
def test_streams_cut_by_the_backend_or_the_timeout_are_charged_what_they_streamed(fake, app, proxy):
    fake.tokens, fake.stall, fake.stall_after = 10, Event(), 5
    queue = app.extensions["ollamamq"]
    with chat(proxy, "timed-out", "hello", stream=True) as response:
        records = [json.loads(line) for line in response.iter_lines()]
    assert "error" in records[-1] and len(records) == 6  # the inactivity timeout cut it
    with chat(proxy, "cut", "hello", stream=True) as response:
        lines = response.iter_lines()
        first = [json.loads(next(lines)) for _ in range(5)]
        fake.stop()  # the backend goes away mid-stream
        rest = [json.loads(line) for line in lines]
    assert len(first) == 5 and "error" in rest[-1]
    for user in ("timed-out", "cut"):
        stats = queue.users[user]
        assert (stats.errors, stats.tokens_in, stats.tokens_out) == (1, 1, 5)
    charge = 1 + 2 * 5  # the input estimate, two per streamed token
    assert queue.queue.service("timed-out") == charge
    assert queue.queue.service("cut") == charge + charge  # it joined at the latest served


def test_a_request_alone_in_the_queue_is_granted_as_it_is_submitted():
    pool = BackendPool(["http://127.0.0.1:9"], 1, 3600)  # never started: no checks, no calls
    dispatcher = Dispatcher(pool, FairQueue("tokens", 2.0), 100, 100)  # its greenlet not started
    first = dispatcher.submit("ann", "llama3:latest", "/api/chat")
    assert first.state == ACTIVE and first.granted.is_set()
    second = dispatcher.submit("bob", "llama3:latest", "/api/chat")
    assert second.state == WAITING  # the only slot is taken: the dispatcher's round decides
    dispatcher.release(first)
    assert second.state == WAITING  # not granted by release: by the dispatcher greenlet
    dispatcher._grant_all()
    assert second.state == ACTIVE
