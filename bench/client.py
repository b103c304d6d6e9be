"""A lean keep-alive HTTP client for the benchmarks: http.client on gevent's sockets.

One connection per simulated client; responses are read chunk by chunk with read1(), so
streamed records are counted, and the time to the first one taken, as they arrive.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from urllib.parse import urlsplit

READ_SIZE = 64 * 1024
TAIL_BYTES = 4096  # the final record of a stream fits in this
TIMEOUT = 60.0  # seconds a socket may stay silent before the request counts as failed


@dataclass(frozen=True)
class Reply:
    """How one request went; `ok` means 200 and a final record with done: true."""

    status: int
    ok: bool
    seconds: float
    ttfb: float | None  # seconds from sending to the first body byte
    records: int  # newline-terminated records received
    wait_ms: float | None  # the proxy's X-Queue-Wait-Ms, if any
    error: str = ""


def connect(url: str, timeout: float = TIMEOUT) -> HTTPConnection:
    """A keep-alive connection to `url`, opened on first use."""
    parts = urlsplit(url)
    return HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)


def generate(tokens: int, stream: bool) -> bytes:
    """A /api/generate body asking for `tokens` tokens."""
    body = {"model": "llama3", "prompt": "hi", "stream": stream}
    return json.dumps({**body, "options": {"num_predict": tokens}}).encode()


def chat(tokens: int, text: str) -> bytes:
    """A streamed /api/chat body asking for `tokens` tokens."""
    messages = [{"role": "user", "content": text}]
    body = {"model": "llama3", "messages": messages, "stream": True}
    return json.dumps({**body, "options": {"num_predict": tokens}}).encode()


def is_done(tail: bytes) -> bool:
    """Whether the last record in `tail` is Ollama's final `done: true` record."""
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("done") is True and "error" not in record


def fetch(conn: HTTPConnection, path: str, body: bytes, user: str) -> Reply:
    """POST `body` and read the whole answer; failures close the connection and return."""
    headers = {"Content-Type": "application/json", "X-User-ID": user}
    started = time.perf_counter()
    try:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        ttfb, records, tail = None, 0, b""
        while data := response.read1(READ_SIZE):
            if ttfb is None:
                ttfb = time.perf_counter() - started
            records += data.count(b"\n")
            tail = (tail + data)[-TAIL_BYTES:]
        response.read()  # read1() leaves a Content-Length body at its end unclosed
    except (OSError, HTTPException) as exc:
        conn.close()
        return Reply(0, False, time.perf_counter() - started, None, 0, None, repr(exc))
    except BaseException:
        conn.close()  # cut off by a deadline: the next request needs a clean connection
        raise
    seconds = time.perf_counter() - started
    wait = response.getheader("X-Queue-Wait-Ms")
    ok = response.status == 200 and is_done(tail)
    error = "" if ok else f"{response.status}: {tail[-200:].decode(errors='replace')}"
    return Reply(response.status, ok, seconds, ttfb, records, float(wait) if wait else None, error)


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values`, to three decimals (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)], 3)
