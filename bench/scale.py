"""The scale curve: FairQueue.grant against backlog and backends, and the plot of the curve.

The grant micro-benchmark drives the pure module only (no server): every user has two
requests waiting for one of three models, and each grant is followed by a push that keeps the
backlog constant; only the grants are timed, in rounds of one free slot per backend.
"blocked" backends hold only the third model, so most users in front of the order cannot be
served and the grant must look past them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ollamamq.fairshare import BackendView, FairQueue, Slots, Waiting

MODELS = ("m0", "m1", "m2")
USERS = (10, 1_000, 10_000)
BACKENDS = (1, 16, 64)


def backlog(users: int) -> FairQueue:
    """A queue with two requests waiting for each of `users` users."""
    queue = FairQueue()
    for i in range(users):
        for _ in range(2):
            queue.push(Waiting(f"u{i}", MODELS[i % len(MODELS)]))
    return queue


def views(count: int, blocked: bool) -> list[BackendView]:
    """`count` backends with a free slot; blocked ones hold only the last model."""
    models = frozenset(MODELS[-1:]) if blocked else frozenset(MODELS)
    return [BackendView(f"b{i}", free=1, active=0, models=models) for i in range(count)]


def grant_cost(queue: FairQueue, backends: int, blocked: bool, budget: float) -> float:
    """Mean microseconds per grant, in rounds as the dispatcher makes them.

    Every backend has one free slot when a round starts; each grant takes one, and the
    round ends when no waiting head fits. The round's Slots is built inside the timing;
    the pushes that refill the backlog afterwards are not timed.
    """
    pool = views(backends, blocked)
    grants, granting, started = 0, 0.0, time.perf_counter()
    while grants < 5 or time.perf_counter() - started < budget:
        before = time.perf_counter()
        slots, granted = Slots(pool), []
        while (choice := queue.grant(slots)) is not None:
            slots.take(choice[1])
            granted.append(choice[0])
        granting += time.perf_counter() - before
        for item in granted:
            queue.push(Waiting(item.user, item.model))
        grants += len(granted)
    return round(1e6 * granting / grants, 1)


def grant_curve(budget: float, users: tuple[int, ...] = USERS) -> list[dict[str, Any]]:
    """Grant cost for every (users, backends) pair, free and blocked; one backlog per size."""
    points = []
    for count in users:
        queue = backlog(count)  # built once: filling it is itself slow (see the report)
        for blocked in (False, True):
            for b in BACKENDS:
                cost = grant_cost(queue, b, blocked, budget)
                points.append({"users": count, "backends": b, "blocked": blocked, "us": cost})
    return points


def plot(curve: dict[str, Any], path: Path) -> Path | None:
    """Three panels (grant cost, CPU per request, peak RSS) as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (grant, cpu, rss) = plt.subplots(1, 3, figsize=(13, 4))
    for blocked in (False, True):
        for b in BACKENDS:
            points = [p for p in curve["grant"] if p["backends"] == b and p["blocked"] == blocked]
            label = f"{b} backends" + (", first model blocked" if blocked else "")
            style = "--" if blocked else "-"
            grant.plot([p["users"] for p in points], [p["us"] for p in points], style, label=label)
    grant.set(xscale="log", yscale="log", xlabel="backlogged users", ylabel="µs per grant")
    grant.set_title("FairQueue.grant")
    grant.legend(fontsize=7)
    for side, points in curve["cpu"].items():
        good = [p for p in points if p["cpu_ms"] is not None]
        cpu.plot([p["concurrency"] for p in good], [p["cpu_ms"] for p in good], "o-", label=side)
    cpu.set(xscale="log", xlabel="concurrent clients", ylabel="CPU ms per request")
    cpu.set_title("server CPU per request")
    cpu.legend(fontsize=7)
    good = [p for p in curve["held"] if p["rss_peak_mb"] is not None]
    rss.plot([p["clients"] for p in good], [p["rss_peak_mb"] for p in good], "o-", label="proxy")
    rss.set(xlabel="streaming clients held (4 slots)", ylabel="peak RSS, MB")
    rss.set_title("proxy peak RSS (VmHWM)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
