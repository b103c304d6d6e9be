"""What passes between client and backend: headers, bodies, token counts, usage events."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import IO

log = logging.getLogger(__name__)

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's Expect: 100-continue was the proxy's to answer; its body is in hand.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect"}
TAIL_BYTES = 2048  # the backend's token counts are in the last record of every format
STREAM_ERRORS = (OSError,)  # every failure of http1's, timeouts included

_COUNT_PATTERNS = (
    (re.compile(rb'"prompt_eval_count":\s*(\d+)'), re.compile(rb'"eval_count":\s*(\d+)')),
    (re.compile(rb'"prompt_tokens":\s*(\d+)'), re.compile(rb'"completion_tokens":\s*(\d+)')),
)


def _connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }


def request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's end-to-end headers, to send to the backend."""
    headers = list(headers)
    drop = NOT_FORWARDED | _connection_tokens(headers)
    return {name: value for name, value in headers if name.lower() not in drop}


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's end-to-end headers, to send to the client (Content-Length included)."""
    headers = list(headers)
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


class SizedStream:
    """A request body read straight from the client, with the length the client declared.

    http1 sends a body with `__len__` with that Content-Length, in pieces, never holding
    it all in memory.
    """

    def __init__(self, stream: IO[bytes], length: int) -> None:
        self._stream = stream
        self._length = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)


def token_counts(tail: bytes) -> tuple[int, int]:
    """(input, output) tokens from the end of a response, in Ollama's or OpenAI's words."""
    for prompt_re, output_re in _COUNT_PATTERNS:
        prompt, output = prompt_re.findall(tail), output_re.findall(tail)
        if prompt or output:
            return int(prompt[-1]) if prompt else 0, int(output[-1]) if output else 0
    return 0, 0


def error_record(message: str, is_sse: bool) -> bytes:
    """The record that ends a stream which failed after its first byte, as Ollama does."""
    if is_sse:
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


# `,"usage":{...}` (or `"usage":{...},` first in its object), compact or spaced, flat or null.
USAGE_MEMBER = re.compile(
    rb',\s*"usage"\s*:\s*(?:\{[^{}]*\}|null)|"usage"\s*:\s*(?:\{[^{}]*\}|null)\s*,\s*'
)


def is_usage_event(event: bytes) -> bool:
    """The SSE event that carries only `usage` (asked for with stream_options)."""
    return b'"choices":[]' in event and b'"usage"' in event


def without_usage(event: bytes) -> bytes:
    """An SSE event with its `usage` member cut out, every other byte as it came.

    Asked for usage, Ollama's /v1/completions also puts a zero usage on every chunk.
    """
    if b'"usage"' not in event:
        return event
    return USAGE_MEMBER.sub(b"", event, count=1)


def drop_usage_events(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The SSE stream as it would be had the proxy not asked for usage: no usage anywhere."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *events, pending = pending.split(b"\n\n")
        kept = b"".join(without_usage(e) + b"\n\n" for e in events if not is_usage_event(e))
        if kept:
            yield kept
    if pending:
        yield pending
