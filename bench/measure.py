"""The four measurements of proxy_bench, each against one URL, each warmed up first.

Every loop is bounded by a count and by a deadline (time.monotonic()); requests not done
by the deadline are dropped and counted as `unfinished`, apart from the errors.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event

from . import wrk
from .client import Reply, connect, fetch, generate, percentile

GENERATE = "/api/generate"
SMALL = generate(1, stream=False)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/PID/stat's CPU times


def warm_until(deadline: float) -> float:
    """The end of the warm-up: a fifth of the time left, so the measurement keeps the rest."""
    now = time.monotonic()
    return now + max(0.0, deadline - now) / 5


def sequential(
    conn: HTTPConnection, body: bytes, user: str, count: int, deadline: float
) -> list[Reply]:
    """Up to `count` requests in a row on one connection, stopping at the deadline."""
    replies: list[Reply] = []
    with gevent.Timeout(max(0.0, deadline - time.monotonic()), False):
        for _ in range(count):
            replies.append(fetch(conn, GENERATE, body, user))
    return replies


def run_clients(
    conns: list[HTTPConnection], count: int, body: bytes, deadline: float
) -> list[Reply]:
    """Each connection sends `count` requests in a row, all as one user, all concurrently."""
    greenlets = [
        gevent.spawn(sequential, conn, body, "bench", count, deadline)
        for i, conn in enumerate(conns)
    ]
    gevent.joinall(greenlets, timeout=max(0.0, deadline - time.monotonic()) + 1)
    gevent.killall(greenlets, timeout=1)
    return [reply for g in greenlets if isinstance(g.value, list) for reply in g.value]


def summary(replies: list[Reply], expected: int, seconds: float) -> dict[str, Any]:
    """Requests per second, latency percentiles and errors of one run."""
    good = [r.seconds * 1000 for r in replies if r.ok]
    bad = [r for r in replies if not r.ok]
    return {
        "requests": expected,
        "ok": len(good),
        "errors": len(bad),
        "unfinished": expected - len(replies),  # not sent or not answered by the deadline
        "error_kinds": dict(Counter(r.error[:80] for r in bad).most_common(5)),
        "seconds": round(seconds, 3),
        "rps": round(len(good) / seconds, 1) if seconds else 0.0,
        "p50_ms": percentile(good, 0.50),
        "p99_ms": percentile(good, 0.99),
    }


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds a process used so far, from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def peak_rss_mb(pid: int | None) -> float | None:
    """A process's peak resident memory (VmHWM) in MB, from /proc/PID/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return round(int(kb) / 1024, 1) if kb else None


def cpu_per_request(pid: int | None, before: float | None, requests: int) -> float | None:
    """Milliseconds of the process's CPU per request since `before`."""
    after = cpu_seconds(pid)
    if before is None or after is None or not requests:
        return None
    return round(1000 * (after - before) / requests, 3)


def latency(url: str, total: int, concurrency: int, deadline: float, pid: int | None) -> dict:
    """Small non-streamed requests from `concurrency` keep-alive clients of one user."""
    conns = [connect(url) for _ in range(concurrency)]
    each = max(1, total // concurrency)
    try:
        warm = max(5, min(200, total // 10) // concurrency)
        run_clients(conns, warm, SMALL, warm_until(deadline))
        before = cpu_seconds(pid)
        started = time.perf_counter()
        replies = run_clients(conns, each, SMALL, deadline)
        seconds = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.close()
    result = summary(replies, each * concurrency, seconds)
    cpu = cpu_per_request(pid, before, len(replies))
    return result | {"concurrency": concurrency, "cpu_ms": cpu, "client": "python"}


def sequential_latency(
    url: str, total: int, seconds: float, deadline: float, pid: int | None
) -> dict[str, Any]:
    """p50 of small requests one after another on one connection: wrk if installed.

    A client in Python shares the two cores with the servers and adds its own wait to
    every request; wrk's C loop adds almost none.
    """
    if not wrk.available():
        return latency(url, total, 1, deadline, pid)
    return throughput(url, 1, seconds, pid)


def throughput(url: str, concurrency: int, seconds: float, pid: int | None) -> dict:
    """Req/s of small requests for `seconds`, with wrk if installed, and CPU per request."""
    if not wrk.available():
        deadline = time.monotonic() + seconds * 1.25  # a fifth of it goes to the warm-up
        result = latency(url, 100_000, concurrency, deadline, pid)
        answered = result["ok"] + result["errors"]  # bounded by time: none is missing
        return result | {"requests": answered, "unfinished": 0}
    wrk.run(url + GENERATE, SMALL, concurrency, 1)  # warm-up
    before = cpu_seconds(pid)
    result = wrk.run(url + GENERATE, SMALL, concurrency, seconds)
    cpu = cpu_per_request(pid, before, result["requests"])
    return result | {"concurrency": concurrency, "cpu_ms": cpu, "client": "wrk"}


def first_byte(url: str, count: int, tokens: int, deadline: float) -> dict[str, Any]:
    """Time to the first byte of a stream, sequential requests on one connection."""
    conn = connect(url)
    body = generate(tokens, stream=True)
    try:
        sequential(conn, body, "bench-ttfb", max(3, min(20, count // 10)), warm_until(deadline))
        replies = sequential(conn, body, "bench-ttfb", count, deadline)
    finally:
        conn.close()
    ttfbs = [r.ttfb * 1000 for r in replies if r.ok and r.ttfb is not None]
    return {
        "requests": count,
        "errors": len(replies) - len(ttfbs),
        "unfinished": count - len(replies),
        "median_ms": round(statistics.median(ttfbs), 3) if ttfbs else None,
        "p99_ms": percentile(ttfbs, 0.99),
    }


def chunk_rate(url: str, tokens: int, repeats: int, deadline: float) -> dict[str, Any]:
    """(c) NDJSON records per second the client receives from one long unpaced stream."""
    conn = connect(url)
    body = generate(tokens, stream=True)
    try:
        sequential(conn, body, "bench-chunks", 1, warm_until(deadline))
        replies = sequential(conn, body, "bench-chunks", repeats, deadline)
    finally:
        conn.close()
    rates = [relay_rate(r) for r in replies if r.ok and r.records == tokens + 1]
    return {
        "tokens": tokens,
        "repeats": repeats,
        "errors": len(replies) - len(rates),
        "unfinished": repeats - len(replies),
        "best": round(max(rates)) if rates else None,
        "median": round(statistics.median(rates)) if rates else None,
    }


def relay_rate(reply: Reply) -> float:
    """Records per second from the first byte to the last: (b) measures the wait before."""
    streaming = reply.seconds - (reply.ttfb or 0.0)
    return (reply.records - 1) / streaming if streaming > 0 else reply.records / reply.seconds


def stream_seconds(url: str, count: int, deadline: float) -> float | None:
    """The median duration of a one-token stream, sequential on one connection."""
    conn = connect(url)
    try:
        replies = sequential(conn, generate(1, stream=True), "bench-one", count, deadline)
    finally:
        conn.close()
    durations = [r.seconds for r in replies if r.ok]
    return statistics.median(durations) if durations else None


def many_streams(
    url: str, clients: int, users: int, deadline: float, pid: int | None
) -> dict[str, Any]:
    """`clients` streamed one-token requests sent at once, one connection each."""
    gate, body, tried = Event(), generate(1, stream=True), []
    warm = connect(url)
    sequential(warm, body, "bench-warm", 8, warm_until(deadline))
    warm.close()
    conns = [connect(url, timeout=max(1.0, deadline - time.monotonic())) for _ in range(clients)]

    def client(i: int) -> Reply:
        try:
            conns[i].connect()  # connect first, so that the requests leave together
        except OSError as exc:
            return Reply(0, False, 0.0, None, 0, None, f"connect: {exc!r}")
        finally:
            tried.append(i)
        gate.wait()
        return fetch(conns[i], GENERATE, body, f"user-{i % users}")

    greenlets = [gevent.spawn(client, i) for i in range(clients)]
    try:
        wait_for(lambda: len(tried) == clients, deadline)
        connected = sum(conn.sock is not None for conn in conns)
        gate.set()
        started = time.perf_counter()
        gevent.joinall(greenlets, timeout=max(0.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - started
    finally:
        gevent.killall(greenlets, timeout=1)
        for conn in conns:
            conn.close()
    replies = [g.value for g in greenlets if isinstance(g.value, Reply)]
    result = summary(replies, clients, seconds)
    del result["rps"]
    result |= {"users": users, "connected": connected}
    return result | {"rss_peak_mb": peak_rss_mb(pid)}


def wait_for(condition: Callable[[], bool], deadline: float) -> None:
    """Yield until `condition()` holds or the deadline passes."""
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(0.01)
