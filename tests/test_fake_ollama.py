"""The fake Ollama speaks the real wire format: raw HTTP checks, then the real clients."""

from __future__ import annotations

import json
from collections.abc import Iterator

import gevent
import ollama
import openai
import pytest
import requests
from gevent.event import Event

from tests.fake_ollama import FakeOllama

TEXT = "".join(f"tok{i} " for i in range(8))  # what every generation says by default
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


def test_generate_streams_ndjson_records_then_done_with_stats(fake: FakeOllama) -> None:
    body = {"model": "LLAMA3", "prompt": "why is the sky blue"}
    with requests.post(f"{fake.url}/api/generate", json=body, stream=True) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        records = [json.loads(line) for line in r.iter_lines()]
    assert "".join(rec["response"] for rec in records[:-1]) == TEXT
    assert not any(rec["done"] for rec in records[:-1])
    last = records[-1]
    assert last["done"] and last["done_reason"] == "stop" and last["response"] == ""
    assert last["eval_count"] == 8 and last["prompt_eval_count"] == 5
    assert last["total_duration"] > 0 and last["model"] == "LLAMA3"
    assert fake.loaded == {"llama3:latest"} and fake.received[0].finished is not None


def test_num_predict_limits_tokens_and_stream_false_answers_one_object(fake: FakeOllama) -> None:
    body = {
        "model": "qwen2:0.5b",
        "messages": HI,
        "stream": False,
        "options": {"num_predict": 3},
    }
    reply = requests.post(f"{fake.url}/api/chat", json=body).json()
    assert reply["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
    assert reply["done_reason"] == "length" and reply["eval_count"] == 3


def test_openai_stream_ends_with_usage_then_done(fake: FakeOllama) -> None:
    body = {
        "model": "llama3",
        "messages": [{"role": "user", "content": "a b c"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(f"{fake.url}/v1/chat/completions", json=body, stream=True) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


def test_pull_streams_progress_then_model_is_listed(fake: FakeOllama) -> None:
    fake.fail_pulls = 1
    failed = requests.post(f"{fake.url}/api/pull", json={"model": "mistral"}).text.splitlines()
    assert json.loads(failed[-1]) == {"error": "pull model manifest: connection reset"}
    with requests.post(f"{fake.url}/api/pull", json={"model": "mistral"}, stream=True) as r:
        records = [json.loads(line) for line in r.iter_lines()]
    progress = [rec["completed"] for rec in records if "completed" in rec]
    assert records[0] == {"status": "pulling manifest"} and records[-1] == {"status": "success"}
    assert progress == sorted(progress) and progress[-1] == records[1]["total"]
    names = [m["name"] for m in requests.get(f"{fake.url}/api/tags").json()["models"]]
    assert "mistral:latest" in names and fake.fail_pulls == 0


def test_gate_holds_a_generation_in_flight_until_set(fake: FakeOllama) -> None:
    fake.gate, arrived = Event(), Event()
    fake.on_request = lambda req: arrived.set()
    body = {"model": "llama3", "prompt": "hello", "stream": False}
    call = gevent.spawn(requests.post, f"{fake.url}/api/generate", json=body)
    arrived.wait(timeout=5)  # wakes only once the handler has blocked at the gate
    assert fake.active == 1 and not call.ready()
    fake.gate.set()
    assert call.get(timeout=5).json()["response"] == TEXT
    assert fake.active == 0 and fake.max_active == 1


def test_records_leave_lazily_and_a_vanished_client_is_recorded(fake: FakeOllama) -> None:
    fake.tokens, fake.token_delay = 1000, 0.001
    body = {"model": "llama3", "prompt": "x"}
    with requests.post(f"{fake.url}/api/generate", json=body, stream=True) as r:
        assert json.loads(next(r.iter_lines()))["response"] == "tok0 "
        assert fake.received[0].finished is None and fake.active == 1
    with gevent.Timeout(5):
        while fake.received[0].finished is None:
            gevent.sleep(0.005)
    assert fake.received[0].disconnected and fake.active == 0


def test_errors_look_like_ollama_and_openai(fake: FakeOllama) -> None:
    body = {"model": "nope", "messages": HI}
    r = requests.post(f"{fake.url}/api/chat", json=body)
    assert r.status_code == 404
    assert r.json() == {"error": 'model "nope" not found, try pulling it first'}
    r = requests.post(f"{fake.url}/v1/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert requests.post(f"{fake.url}/api/generate", data="{").status_code == 400
    assert requests.get(f"{fake.url}/nope").text == "404 page not found"
    fake.busy = True
    assert requests.post(f"{fake.url}/api/generate", json={"model": "llama3"}).status_code == 503


def test_real_ollama_client_parses_every_answer(fake: FakeOllama) -> None:
    with ollama.Client(host=fake.url) as client:
        chat = list(client.chat("llama3", HI, stream=True))
        assert "".join(part.message.content for part in chat) == TEXT
        assert client.generate("llama3", "hi").response.startswith("tok0")
        assert client.pull("phi3").status == "success"
        assert "phi3:latest" in [m.model for m in client.list().models]
        assert client.show("llama3").capabilities == ["completion"]
        assert [m.model for m in client.ps().models] == ["llama3:latest"]
        assert len(client.embed("nomic-embed-text", ["a", "b"]).embeddings) == 2
        with pytest.raises(ollama.ResponseError) as missing:
            client.chat("nope", HI)
        assert missing.value.status_code == 404


def test_real_openai_client_parses_every_answer(fake: FakeOllama) -> None:
    with openai.OpenAI(base_url=f"{fake.url}/v1", api_key="x", max_retries=0) as client:
        options = {"include_usage": True}
        stream = client.chat.completions.create(
            model="llama3", messages=HI, stream=True, stream_options=options
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
        assert chunks[-1].usage.completion_tokens == 8
        reply = client.chat.completions.create(model="llama3", messages=HI, max_tokens=2)
        assert reply.choices[0].finish_reason == "length" and reply.usage.total_tokens == 3
        assert client.completions.create(model="llama3", prompt="hi").choices[0].text == TEXT
        vectors = client.embeddings.create(model="nomic-embed-text", input=["a", "b"]).data
        assert [len(v.embedding) for v in vectors] == [8, 8]
        assert "llama3:latest" in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
