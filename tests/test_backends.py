"""Several backends: routing by model, least-connections, loaded models, failures, busy 503."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gevent
import ollama
import openai
import pytest
import requests
from gevent.event import Event

from ollamamq import create_app
from ollamamq.backends import BackendPool
from tests.conftest import Calls, served, settings, wait_arrivals
from tests.fake_ollama import FakeOllama, model_entry
from tests.test_lifecycle import raw_request


@contextlib.contextmanager
def backends(*model_lists: list[str]) -> Iterator[list[FakeOllama]]:
    fakes = [
        FakeOllama(models=models, name=f"b{i}").start() for i, models in enumerate(model_lists)
    ]
    try:
        yield fakes
    finally:
        for fake in fakes:
            fake.stop()


@contextlib.contextmanager
def proxy_for(specs: list[str], monkeypatch=None, **config) -> Iterator[tuple[str, object]]:
    app = create_app(settings(specs, **config))
    with served(app) as url:
        yield url, app


def chat(url: str, model: str = "llama3", user: str = "u", **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return requests.post(
        f"{url}/api/chat", json={**body, **extra}, headers={"X-User-ID": user}, timeout=10
    )


def chats(fake: FakeOllama) -> int:
    return sum(r.path == "/api/chat" for r in fake.received)


def test_requests_go_only_to_backends_that_have_the_model():
    with (
        backends(["llama3"], ["qwen2:0.5b"]) as (llama, qwen),
        proxy_for([llama.url, qwen.url]) as (url, _),
    ):
        assert chat(url, "qwen2:0.5b").status_code == 200
        assert chat(url, "LLAMA3").status_code == 200
        assert (chats(llama), chats(qwen)) == (1, 1)
        missing = chat(url, "mistral")
        assert missing.status_code == 404 and "mistral" in missing.json()["error"]


def test_listings_are_the_union_of_every_backend():
    with (
        backends(["llama3"], ["qwen2:0.5b", "llama3"]) as (one, two),
        proxy_for([one.url, two.url]) as (url, _),
    ):
        tags = requests.get(f"{url}/api/tags", timeout=10).json()["models"]
        assert sorted(m["model"] for m in tags) == ["llama3:latest", "qwen2:0.5b"]
        ids = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert ids == {"llama3:latest", "qwen2:0.5b"}
        chat(url, "qwen2:0.5b")
        chat(url, "llama3")
        loaded = requests.get(f"{url}/api/ps", timeout=10).json()["models"]
        assert sorted(m["model"] for m in loaded) == ["llama3:latest", "qwen2:0.5b"]
        shown = requests.post(f"{url}/api/show", json={"model": "qwen2:0.5b"}, timeout=10)
        assert shown.status_code == 200


def test_free_slots_on_every_backend_are_filled_least_active_first(monkeypatch):
    with (
        backends(["llama3"], ["llama3"]) as (one, two),
        proxy_for([f"{one.url}#2", two.url]) as (url, app),
    ):
        calls = Calls(app.extensions["ollamamq"], monkeypatch)
        one.gate = two.gate = Event()
        jobs = []
        for n in range(5):
            jobs.append(gevent.spawn(chat, url, user=f"user{n}"))
            calls.wait_for("submit", n + 1)
        wait_arrivals(one, "/api/chat", 2)
        wait_arrivals(two, "/api/chat", 1)
        dispatcher = app.extensions["ollamamq"]
        assert (dispatcher.active_count, dispatcher.waiting_count) == (3, 2)
        one.gate.set()
        gevent.joinall(jobs, raise_error=True)
        assert all(job.value.status_code == 200 for job in jobs)
        assert (one.max_active, two.max_active) == (2, 1)


def test_a_backend_with_the_model_loaded_is_preferred():
    with backends(["llama3"], ["llama3"]) as (cold, warm):
        warm.loaded.add("llama3:latest")
        with proxy_for([cold.url, warm.url]) as (url, _):
            for _ in range(3):
                assert chat(url).status_code == 200
        assert (chats(cold), chats(warm)) == (0, 3)


def test_a_backend_going_down_mid_run_is_skipped_and_comes_back():
    with (
        backends(["llama3"], ["llama3"]) as (flaky, steady),
        proxy_for([flaky.url, steady.url]) as (url, app),
    ):
        assert [chat(url).status_code for _ in range(4)] == [200] * 4
        assert chats(flaky) == 4  # it has the model loaded now
        port = int(flaky.url.rsplit(":", 1)[1])
        flaky.stop()
        steady.reset()
        assert [chat(url).status_code for _ in range(4)] == [200] * 4  # none lost
        assert chats(steady) == 4
        health = requests.get(f"{url}/health", timeout=10).json()
        assert [b["up"] for b in health["backends"]] == [False, True]
        flaky.start(port)
        app.extensions["ollamamq"].pool.check_all()
        assert [b["up"] for b in requests.get(f"{url}/health").json()["backends"]] == [True, True]
        assert [chat(url).status_code for _ in range(4)] == [200] * 4
        assert chats(flaky) > 0


def test_busy_backend_sends_work_elsewhere_not_back_to_the_user():
    with (
        backends(["llama3"], ["llama3"]) as (busy, free),
        proxy_for([busy.url, free.url], BUSY_RETRY_S=60) as (url, app),
    ):
        busy.busy = True
        assert [chat(url, user=f"u{n}").status_code for n in range(4)] == [200] * 4
        assert chats(busy) == 1 and chats(free) == 4  # tried once, then rested
        assert app.extensions["ollamamq"].users["u0"].errors == 0


def test_busy_only_backend_is_retried_later():
    with backends(["llama3"]) as (only,), proxy_for([only.url], BUSY_RETRY_S=0.05) as (url, _):
        only.busy = True
        only.on_request = lambda r: setattr(only, "busy", chats(only) < 3)
        assert chat(url).status_code == 200
        assert chats(only) == 3


def test_openai_stream_is_charged_by_usage_the_client_did_not_ask_for(fake, app, proxy):
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key="x") as client:
        stream = client.chat.completions.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = list(stream)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices
    sent = next(r for r in fake.received if r.path == "/v1/chat/completions")
    assert sent.json["stream_options"] == {"include_usage": True}
    (stats,) = app.extensions["ollamamq"].users.values()
    assert stats.tokens_out == 8


def test_position_endpoint_tells_a_user_where_they_stand(fake, app, proxy, calls):
    fake.gate = Event()
    jobs = [gevent.spawn(chat, proxy, user="hog")]
    calls.wait_for("submit", 1)
    wait_arrivals(fake, "/api/chat", 1)
    for n, user in enumerate(["hog", "hog", "me", "me"], start=2):
        jobs.append(gevent.spawn(chat, proxy, user=user))
        calls.wait_for("submit", n)
    mine = requests.get(f"{proxy}/api/position", headers={"X-User-ID": "me"}, timeout=10).json()
    # me joins at hog's counter: a tie, and hog's next request has waited longer
    assert [w["position"] for w in mine["waiting"]] == [2, 4]
    assert all(w["estimated_wait_s"] > 0 for w in mine["waiting"])
    hog = requests.get(f"{proxy}/api/position", headers={"X-User-ID": "hog"}, timeout=10).json()
    assert len(hog["active"]) == 1 and [w["position"] for w in hog["waiting"]] == [1, 3]
    fake.gate.set()
    gevent.joinall(jobs, raise_error=True)


def test_waiting_stream_stays_silent_until_served(fake, proxy, calls):
    fake.gate = Event()
    holder = gevent.spawn(chat, proxy, user="first")
    calls.wait_for("submit", 1)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    sock = raw_request(proxy, "/api/chat", body, "second")
    calls.wait_for("submit", 2)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1)  # queued: not a byte, not even headers
    sock.setblocking(True)
    fake.gate.set()
    received = b""
    while not received.endswith(b"0\r\n\r\n"):
        received += sock.recv(65536)
    sock.close()
    assert received.startswith(b"HTTP/1.1 200") and b'"done":true' in received
    holder.join()


@pytest.mark.parametrize("config", [{"FAIRNESS": "requests"}])
def test_request_fairness_can_be_chosen(app):
    assert app.extensions["ollamamq"].queue.fairness == "requests"


def test_a_model_added_behind_the_proxys_back_is_served_at_once():
    with backends(["llama3"]) as (fake,), proxy_for([fake.url]) as (url, app):
        assert chat(url).status_code == 200  # the catalog is read: llama3 only
        fake.models["mistral:latest"] = model_entry("mistral:latest")  # `ollama pull` there
        assert chat(url, "mistral").status_code == 200
        assert chat(url, "phi3").status_code == 404


def test_misses_arriving_together_share_one_catalog_refresh(monkeypatch):
    pool = BackendPool(["http://127.0.0.1:9#1"], 1, interval=3600)
    pool.backends[0].models = frozenset({"llama3:latest"})
    started, gate, refreshes = Event(), Event(), []

    def refresh(timeout: float) -> None:
        refreshes.append(timeout)
        started.set()
        gate.wait()

    monkeypatch.setattr(pool.backends[0], "refresh_models", refresh)
    misses = [gevent.spawn(pool.has_model, "mistral") for _ in range(5)]
    started.wait()  # every miss has run up to its wait by now: greenlets run in spawn order
    gate.set()
    gevent.joinall(misses)
    assert [m.value for m in misses] == [False] * 5 and len(refreshes) == 1


def test_listings_with_every_backend_down_are_a_502_naming_them():
    with backends(["llama3"], ["qwen2:0.5b"]) as (one, two):
        with proxy_for([one.url, two.url]) as (url, _):
            one.stop()
            tags = requests.get(f"{url}/api/tags", timeout=10)
            assert tags.status_code == 200  # the union of what answered
            assert [m["model"] for m in tags.json()["models"]] == ["qwen2:0.5b"]
            two.stop()
            for path in ("/api/tags", "/api/ps"):
                down = requests.get(f"{url}{path}", timeout=10)
                assert down.status_code == 502
                assert "no backend answered" in down.json()["error"]
                assert one.url.split("://")[1] in down.json()["error"]
            models = requests.get(f"{url}/v1/models", timeout=10)
            assert models.status_code == 502 and models.json()["error"]["type"] == "api_error"
            with ollama.Client(host=url) as client, pytest.raises(ollama.ResponseError) as raised:
                client.list()
            assert raised.value.status_code == 502
