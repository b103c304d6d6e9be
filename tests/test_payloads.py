"""The small pure pieces: reading request bodies, and the stream pipeline's steps."""

from __future__ import annotations

import json

import pytest

from ollamamq.payloads import (
    BadPayload,
    ask_for_usage,
    estimate_input_tokens,
    json_object,
    model_named_in,
    output_limit,
    parse_request,
)
from ollamamq.upstream import (
    drop_usage_events,
    error_record,
    request_headers,
    response_headers,
    token_counts,
)

USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":8}}'
DELTA = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}'


def test_input_estimate_counts_the_text_sent():
    chat = {"messages": [{"role": "user", "content": "x" * 40}, {"content": "y" * 8}]}
    assert estimate_input_tokens(chat) == 12
    assert estimate_input_tokens({"prompt": "abcd", "system": "efgh"}) == 2
    assert estimate_input_tokens({"input": ["abcd", "efgh", 3]}) == 2


def test_output_limit_comes_from_options_or_openai_fields():
    assert output_limit("/api/chat", {"options": {"num_predict": 64}}) == 64
    assert output_limit("/v1/chat/completions", {"max_completion_tokens": 9}) == 9
    assert output_limit("/v1/completions", {"max_tokens": 5}) == 5
    assert output_limit("/api/generate", {"options": {"num_predict": -1}}) is None
    assert output_limit("/api/embed", {}) == 0


def test_usage_is_asked_for_only_when_the_client_did_not():
    body, strip = ask_for_usage("/v1/chat/completions", {"model": "m", "stream": True}, b"")
    assert strip and json.loads(body)["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert ask_for_usage("/v1/chat/completions", asked, b"{}") == (b"{}", False)
    assert ask_for_usage("/api/chat", {"stream": True}, b"{}") == (b"{}", False)


def test_model_is_read_from_model_or_name():
    assert model_named_in(json_object(b'{"name": "llama3"}')) == "llama3"
    assert model_named_in({"model": 3}) is None
    with pytest.raises(BadPayload):
        json_object(b"not json")


def test_each_field_the_proxy_reads_must_have_its_type():
    for body, message in (
        (b'{"model": 3}', "model must be a string"),
        (b'{"model": "m", "messages": "hi"}', "messages must be a list"),
        (b'{"model": "m", "messages": [1]}', "each of messages must be an object"),
        (b'{"model": "m", "options": []}', "options must be an object"),
        (b'{"model": "m", "stream": "yes"}', "stream must be true or false"),
        (b'{"model": "m", "max_tokens": true}', "max_tokens must be an integer"),
        (b'{"model": "m", "stream_options": {"include_usage": 1}}', "include_usage"),
    ):
        with pytest.raises(BadPayload) as refused:
            parse_request(body)
        assert message in refused.value.description
    assert parse_request(b'{"model": "m", "prompt": ["a", "b"], "stream_options": null}')


def test_usage_event_is_dropped_even_across_chunk_boundaries():
    stream = DELTA + b"\n\n" + USAGE[:20], USAGE[20:] + b"\n\n", b"data: [DONE]\n\n"
    out = b"".join(drop_usage_events(iter(stream)))
    assert out == DELTA + b"\n\ndata: [DONE]\n\n"


def test_token_counts_in_both_dialects():
    ollama_final = b'{"done":true,"prompt_eval_count":26,"eval_count":298}\n'
    assert token_counts(b"...\n" + ollama_final) == (26, 298)
    assert token_counts(USAGE + b"\n\ndata: [DONE]\n\n") == (3, 8)
    assert token_counts(b'{"embeddings":[[0.1]]}') == (0, 0)


def test_error_records_in_both_dialects():
    assert json.loads(error_record("boom", is_sse=False)) == {"error": "boom"}
    event = error_record("boom", is_sse=True)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["message"] == "boom"


def test_hop_by_hop_headers_are_dropped_both_ways():
    sent = request_headers(
        [
            ("Host", "x"),
            ("Connection", "close, X-Drop"),
            ("X-Drop", "1"),
            ("Content-Length", "3"),
            ("X-User-ID", "ana"),
        ]
    )
    assert sent == {"X-User-ID": "ana"}
    back = response_headers([("Transfer-Encoding", "chunked"), ("Content-Type", "a/b")])
    assert back == [("Content-Type", "a/b")]
