"""The four measurements of proxy_bench, each against one URL, each warmed up first.

Every loop is bounded by a count and by a deadline (time.monotonic()); requests not done
by the deadline are dropped and counted as `unfinished`, apart from the errors.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from http.client import HTTPConnection
from typing import Any

import gevent
import psutil
from gevent.event import Event

from .client import Reply, connect, fetch, generate, percentile

GENERATE = "/api/generate"
SMALL = generate(1, stream=False)
SAMPLE_EVERY = 0.05  # seconds between RSS samples


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
    """Each connection sends `count` requests in a row as its own user, all concurrently."""
    greenlets = [
        gevent.spawn(sequential, conn, body, f"bench-{i}", count, deadline)
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


def cpu_seconds(pids: dict[str, int | None]) -> dict[str, float]:
    """User plus system CPU seconds used so far by each named process that can be seen."""
    used = {}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times() if pid else None
        except psutil.Error:
            times = None
        if times is not None:
            used[name] = times.user + times.system
    return used


def latency(
    url: str, total: int, concurrency: int, deadline: float, pids: dict[str, int | None]
) -> dict[str, Any]:
    """(a) Small non-streamed requests from `concurrency` keep-alive clients, distinct users."""
    conns = [connect(url) for _ in range(concurrency)]
    each = max(1, total // concurrency)
    try:
        warm = max(5, min(200, total // 10) // concurrency)
        run_clients(conns, warm, SMALL, warm_until(deadline))
        before = cpu_seconds(pids)
        started = time.perf_counter()
        replies = run_clients(conns, each, SMALL, deadline)
        seconds = time.perf_counter() - started
        after = cpu_seconds(pids)
    finally:
        for conn in conns:
            conn.close()
    result = summary(replies, each * concurrency, seconds)
    cpu = {name: round(100 * (after[name] - before[name]) / seconds, 1) for name in after}
    return result | {"concurrency": concurrency, "cpu_percent": cpu}


def first_byte(url: str, count: int, deadline: float) -> dict[str, Any]:
    """(b) Time to the first byte of a 16-token stream, sequential requests on one connection."""
    conn = connect(url)
    body = generate(16, stream=True)
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


class PeakRss:
    """Samples one process's RSS every 50 ms in its own greenlet; only that greenlet writes."""

    def __init__(self, pid: int | None) -> None:
        try:
            self.process = psutil.Process(pid) if pid else None
        except psutil.Error:
            self.process = None
        self.start_mb = self._sample()
        self.peak_mb = self.start_mb
        self._greenlet = gevent.spawn(self._run)
        self._greenlet.name = "bench-rss"

    def _sample(self) -> float:
        try:
            return self.process.memory_info().rss / 2**20 if self.process else 0.0
        except psutil.Error:
            return 0.0

    def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, self._sample())
            gevent.sleep(SAMPLE_EVERY)

    def stop(self) -> None:
        """Take a last sample and stop."""
        self._greenlet.kill()
        self.peak_mb = max(self.peak_mb, self._sample())


def many_streams(
    url: str, clients: int, users: int, deadline: float, pid: int | None
) -> dict[str, Any]:
    """(d) `clients` streamed 8-token requests sent at once, one connection each."""
    gate, body, tried = Event(), generate(8, stream=True), []
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

    rss = PeakRss(pid)
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
        rss.stop()
        for conn in conns:
            conn.close()
    replies = [g.value for g in greenlets if isinstance(g.value, Reply)]
    result = summary(replies, clients, seconds)
    del result["rps"]
    result |= {"users": users, "connected": connected}
    return result | {"rss_start_mb": round(rss.start_mb, 1), "rss_peak_mb": round(rss.peak_mb, 1)}


def wait_for(condition: Callable[[], bool], deadline: float) -> None:
    """Yield until `condition()` holds or the deadline passes."""
    while not condition() and time.monotonic() < deadline:
        gevent.sleep(0.01)
