"""Operators load and unload models through the fair queue, never past a backend's slots."""

from __future__ import annotations

import gevent
import pytest
import requests
from gevent.event import Event

from tests.conftest import wait_arrivals

PASSWORD = "residency pass"
pytestmark = pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": PASSWORD}])
AUTH = {"Authorization": f"Bearer {PASSWORD}"}


def act(proxy: str, backend: str, model: str, action: str, **headers: str) -> requests.Response:
    url = f"{proxy}/admin/api/backends/{backend}/models/{model}/{action}"
    return requests.post(url, headers=headers or AUTH, json={}, timeout=10)


def overview(proxy: str) -> dict:
    return requests.get(f"{proxy}/admin/api/overview", headers=AUTH, timeout=10).json()


def name_of(fake) -> str:
    return fake.url.split("://", 1)[1]


def test_load_then_unload_as_ollama_documents(proxy, fake):
    loaded = act(proxy, name_of(fake), "llama3", "load")
    assert loaded.status_code == 200, loaded.text
    assert "llama3:latest" in fake.loaded
    (backend,) = overview(proxy)["backends"]
    (running,) = backend["running"]
    assert running["model"] == "llama3:latest" and running["size_vram"] > 0
    assert running["expires_at"] and 0 < running["expires_in_s"] <= 300
    unloaded = act(proxy, name_of(fake), "llama3", "unload")
    assert unloaded.status_code == 200 and unloaded.json()["reason"] == "unload"
    assert not fake.loaded and overview(proxy)["backends"][0]["running"] == []
    sent = [r.json for r in fake.received if r.path == "/api/generate"]
    assert sent == [
        {"model": "llama3:latest", "stream": False},
        {"model": "llama3:latest", "stream": False, "keep_alive": 0},
    ]


def test_a_load_waits_for_a_free_slot(proxy, fake, calls):
    fake.gate = Event()
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    chat = gevent.spawn(requests.post, f"{proxy}/api/chat", json=body, timeout=10)
    wait_arrivals(fake, "/api/chat", 1)
    load = gevent.spawn(act, proxy, name_of(fake), "llama3", "load")
    calls.wait_for("submit", 2)
    queue = requests.get(f"{proxy}/admin/api/queue", headers=AUTH, timeout=5).json()
    assert [w["user"] for w in queue["waiting"]] == ["admin"]
    assert not any(r.path == "/api/generate" for r in fake.received)
    fake.gate.set()
    assert chat.get().status_code == 200 and load.get().status_code == 200
    assert fake.max_active == 1


def test_unknown_backend_or_model_is_404(proxy, fake):
    assert act(proxy, "nowhere:1", "llama3", "load").status_code == 404
    assert act(proxy, name_of(fake), "no-such-model", "load").status_code == 404


def test_only_the_admin_may_load(proxy, fake):
    refused = act(proxy, name_of(fake), "llama3", "load", Authorization="Bearer wrong")
    assert refused.status_code == 401
    assert not any(r.path == "/api/generate" for r in fake.received)


def test_the_overview_page_offers_load_and_unload(proxy, fake):
    assert act(proxy, name_of(fake), "llama3", "load").status_code == 200
    page = requests.get(f"{proxy}/admin/fragment/overview", headers=AUTH, timeout=10).text
    assert "/models/llama3:latest/unload" in page and "in VRAM" in page
    assert "/models/qwen2:0.5b/load" in page and "/models/llama3:latest/load" not in page


def test_top_selects_a_model_and_loads_it_with_l_then_unloads_with_u(proxy, fake):
    from ollamamq import top

    session = top.make_session(PASSWORD)
    state = top.fetch(session, proxy, top.TopState(url=proxy))
    listed = top.models(state.overview)
    assert [m for _, m in listed] == sorted(fake.models) and len(listed) == 3
    assert top.selected_model(state) == listed[0]
    assert top.selected_model(top.handle_key(state, "m")) == listed[1]
    for _ in range(listed.index((name_of(fake), "llama3:latest")) + len(listed)):
        state = top.handle_key(state, "m")  # once round the list and on to llama3
    state = top.send_action(session, proxy, top.handle_key(state, "l"))
    assert state.action is None and "load done" in state.notice
    assert fake.loaded == {"llama3:latest"}
    state = top.fetch(session, proxy, state)
    assert "llama3:latest (4.7 GB)" in top.loaded_models(state.overview["backends"][0])
    top.send_action(session, proxy, top.handle_key(state, "u"))
    assert not fake.loaded
