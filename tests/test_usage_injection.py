"""The usage the proxy asks for is invisible: clients see the stream the backend would send."""

from __future__ import annotations

import re

import openai
import pytest
import requests

from tests.test_clients import HI

PER_CALL = re.compile(rb'"id":"[a-z]+-\d+"|"created":\d+')  # differ from call to call
BODIES = {
    "/v1/chat/completions": {"model": "llama3", "messages": HI, "stream": True},
    "/v1/completions": {"model": "llama3", "prompt": "Say hi", "stream": True},
}


def streamed(url: str, path: str, body: dict) -> bytes:
    with requests.post(f"{url}{path}", json=body, timeout=10, stream=True) as response:
        assert response.status_code == 200
        return PER_CALL.sub(b"<per-call>", b"".join(response.iter_content(None)))


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("asked", [False, True])
def test_the_client_sees_the_backends_own_stream_byte_for_byte(proxy, fake, path, asked):
    body = BODIES[path] | ({"stream_options": {"include_usage": True}} if asked else {})
    direct, relayed = streamed(fake.url, path, body), streamed(proxy, path, body)
    assert relayed == direct
    assert (b'"usage"' in relayed) is asked  # present exactly when the client asked


def test_the_openai_sdks_completion_chunks_carry_no_usage_unasked(proxy, app):
    with openai.OpenAI(base_url=f"{proxy}/v1", api_key="x", max_retries=0) as client:
        chunks = list(client.completions.create(model="llama3", prompt="hi", stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    users = app.extensions["ollamamq"].users
    assert sum(u.tokens_out for u in users.values()) == 8  # still charged by the usage
