"""`langchain-ollama` (ChatOllama, OllamaLLM, OllamaEmbeddings) through the proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import reduce

import ollama
import pytest
from gevent.event import Event
from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM

from tests.test_clients import TEXT, USER


@pytest.fixture
def make(proxy: str) -> Iterator[Callable]:
    """Build a langchain model bound to the proxy; its HTTP connections close after the test."""
    made = []

    def build(kind: type, model: str):
        made.append(kind(model=model, base_url=proxy, client_kwargs={"headers": USER}))
        return made[-1]

    yield build
    for model in made:
        model._client.close()  # langchain-ollama leaves its ollama.Client open


def test_chat_streamed_and_not(make, app):
    chat = make(ChatOllama, "llama3")
    assert chat.invoke("hi").content == TEXT
    whole = reduce(lambda a, b: a + b, chat.stream("hi"))
    assert whole.content == TEXT and whole.usage_metadata["output_tokens"] == 8
    assert app.extensions["ollamamq"].users["client-test"].served == 2


def test_generate_and_embed(make):
    assert make(OllamaLLM, "qwen2:0.5b").invoke("hi") == TEXT
    embeddings = make(OllamaEmbeddings, "nomic-embed-text")
    assert len(embeddings.embed_documents(["a", "b"])) == 2
    assert embeddings.embed_query("a")


def test_a_missing_model_is_the_librarys_own_error(make):
    with pytest.raises(ollama.ResponseError) as caught:
        make(ChatOllama, "missing").invoke("hi")
    assert caught.value.status_code == 404


@pytest.mark.parametrize("config", [{"BACKEND_PARALLEL": 1}])
def test_a_stream_left_early_frees_the_slot_at_once(make, fake, calls):
    fake.stall = Event()  # the answer stops after its first token
    stream = make(ChatOllama, "llama3").stream("hi")
    assert next(stream).content == "tok0 "
    stream.close()  # a chat UI's stop button: the generator closes the HTTP response
    calls.wait_for("release", 1)
    fake.stall.set()
    fake.stall = None
    assert make(ChatOllama, "llama3").invoke("hi").content == TEXT
