"""The official `ollama` and `openai` packages work through the proxy unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

TEXT = "".join(f"tok{i} " for i in range(8))
HI = [{"role": "user", "content": "hi"}]
USER = {"X-User-ID": "client-test"}


@pytest.fixture
def ollama_client(proxy: str) -> Iterator[ollama.Client]:
    client = ollama.Client(host=proxy, headers=USER)
    yield client
    client._client.close()


@pytest.fixture
def openai_client(proxy: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key="secret", default_headers=USER) as client:
        yield client


def test_ollama_chat_and_generate_stream_and_not(ollama_client, app):
    parts = list(ollama_client.chat(model="llama3", messages=HI, stream=True))
    assert "".join(p.message.content for p in parts) == TEXT and parts[-1].done
    assert ollama_client.chat(model="llama3", messages=HI).message.content == TEXT
    parts = list(ollama_client.generate(model="qwen2:0.5b", prompt="hi", stream=True))
    assert "".join(p.response for p in parts) == TEXT and parts[-1].eval_count == 8
    assert ollama_client.generate(model="qwen2:0.5b", prompt="hi").response == TEXT
    stats = app.extensions["ollamamq"].users["client-test"]
    assert (stats.served, stats.tokens_out) == (4, 32)


def test_ollama_embeddings(ollama_client):
    assert len(ollama_client.embed(model="nomic-embed-text", input=["a", "b"]).embeddings) == 2
    assert ollama_client.embeddings(model="nomic-embed-text", prompt="a").embedding


def test_ollama_metadata_calls(ollama_client, proxy):
    names = {m.model for m in ollama_client.list().models}
    assert {"llama3:latest", "qwen2:0.5b"} <= names
    assert ollama_client.show("llama3").details.family
    ollama_client.generate(model="llama3", prompt="warm up")
    assert [m.model for m in ollama_client.ps().models] == ["llama3:latest"]
    assert httpx.get(f"{proxy}/api/version").json()["version"]


def test_ollama_client_sees_missing_model_as_response_error(ollama_client):
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model="missing", messages=HI)
    assert caught.value.status_code == 404


def test_openai_chat_stream_with_usage_and_not(openai_client):
    stream = openai_client.chat.completions.create(
        model="llama3", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-1].usage.completion_tokens == 8
    reply = openai_client.chat.completions.create(model="llama3", messages=HI)
    assert reply.choices[0].message.content == TEXT and reply.usage.total_tokens > 8


def test_openai_completions_embeddings_and_models(openai_client):
    assert openai_client.completions.create(model="llama3", prompt="hi").choices[0].text == TEXT
    vectors = openai_client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert len(vectors.data) == 2
    assert "llama3:latest" in {m.id for m in openai_client.models.list()}
    assert openai_client.models.retrieve("llama3:latest").id == "llama3:latest"


def test_openai_client_sees_queue_limits_as_rate_limit_errors(openai_client, app):
    app.extensions["ollamamq"].max_per_user = 0
    with pytest.raises(openai.RateLimitError):
        openai_client.with_options(max_retries=0).chat.completions.create(
            model="llama3", messages=HI
        )


def test_api_key_identifies_the_user_when_there_is_no_user_header(proxy, app):
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key="k-123") as client:
        client.chat.completions.create(model="llama3", messages=HI)
    users = set(app.extensions["ollamamq"].users)
    assert len(users) == 1 and next(iter(users)).startswith("key-")
    assert "k-123" not in next(iter(users))


def test_model_management_passes_straight_through(ollama_client, fake, tmp_path):
    blob = tmp_path / "weights.gguf"
    blob.write_bytes(b"GGUF" + bytes(300_000))
    digest = ollama_client.create_blob(blob)
    assert digest in fake.blobs
    assert ollama_client.create(model="mine", from_="llama3").status == "success"
    assert ollama_client.copy("llama3", "llama3-copy").status == "success"
    assert ollama_client.delete("llama3-copy").status == "success"
    assert "llama3-copy:latest" not in fake.models
    assert list(ollama_client.push("mine", stream=True))[-1].status == "success"


def test_chunked_upload_is_streamed_to_the_backend(proxy, fake):
    pieces = (bytes([i]) * 65536 for i in range(8))  # no length: sent chunked
    blob = "/api/blobs/sha256:" + "ab" * 32
    response = httpx.post(f"{proxy}{blob}", content=pieces)
    assert response.status_code == 201
    upload = next(r for r in fake.received if r.path == blob)
    assert len(upload.body) == 8 * 65536
