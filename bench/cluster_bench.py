"""Replicas through Redis beside one process alone: the cost of sharing the queue.

    python -m bench.cluster_bench [--seconds 4] [--rounds 2] [--requests 2000]

One fake backend (1 token, no delay, 4 slots per proxy). Sides, interleaved per round so a
noisy machine moves them alike: the backend direct; one proxy alone; one replica with a
redis-server; two replicas sharing it, the load split between them. Figures: added p50 at
c=1, CPU per request of the proxies (and of redis-server, apart), req/s at c=32.
"""

# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import gevent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, servers
from bench.servers import Server
from tests.real_servers import redis_server

SLOTS = 4
REDIS_PID: int | None = None  # the redis-server's, for its CPU per request


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per c=32 run (4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    parser.add_argument("--requests", type=int, default=2000, help="at c=1, per run (2000)")
    return parser.parse_args(argv)


def start_sides(stack: ExitStack, backend: str) -> dict[str, list[Server]]:
    """Every side's servers: the proxies a load goes to (the backend itself for direct)."""
    redis_url = stack.enter_context(redis_server())
    shared = Path(stack.enter_context(tempfile.TemporaryDirectory()))

    def proxy(name: str, *extra: str, database: Path | None = None) -> Server:
        server = servers.start_proxy(backend, SLOTS, list(extra), name=name, database=database)
        stack.callback(servers.stop, server)
        stack.callback(servers.remove_logs, [server])
        return server

    def replica(name: str, database: Path) -> Server:
        return proxy(name, "--redis-url", redis_url, "--replica-id", name, database=database)

    global REDIS_PID
    REDIS_PID = servers.pid_listening(redis_url.replace("redis://", "http://"))
    return {
        "direct": [servers.external("direct", backend)],
        "alone": [proxy("alone")],
        "redis, 1 replica": [replica("one", shared / "one.db")],
        "redis, 2 replicas": [replica("r0", shared / "two.db"), replica("r1", shared / "two.db")],
    }


def cpu(pids: list[int | None]) -> float | None:
    times = [measure.cpu_seconds(pid) for pid in pids]
    return None if None in times else sum(times)


def one_side(targets: list[Server], concurrency: int, seconds: float, total: int) -> dict:
    """Load split evenly over `targets`, at once; their summed req/s and CPU per request."""
    each = max(1, concurrency // len(targets))
    pids = [t.pid for t in targets]
    before, redis_before = cpu(pids), measure.cpu_seconds(REDIS_PID)
    deadline = time.monotonic() + seconds * 1.25
    runs = [
        gevent.spawn(measure.latency, t.url, total // len(targets), each, deadline, None)
        for t in targets
    ]
    results = [run.get() for run in runs]
    ok = sum(r["ok"] for r in results)
    used, redis_used = cpu(pids), measure.cpu_seconds(REDIS_PID)
    redis_ms = 1000 * (redis_used - redis_before) / ok if ok and redis_used is not None else None
    return {
        "redis_cpu_ms": round(redis_ms, 3) if redis_ms is not None else None,
        "rps": round(sum(r["rps"] for r in results), 1),
        "p50_ms": statistics.mean(r["p50_ms"] for r in results if r["p50_ms"] is not None),
        "errors": sum(r["errors"] for r in results),
        "cpu_ms": round(1000 * (used - before) / ok, 3) if before is not None and ok else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with ExitStack() as stack:
        fake = servers.start_fake(tokens=1)
        stack.callback(servers.stop, fake)
        stack.callback(servers.remove_logs, [fake])
        sides = start_sides(stack, fake.url)
        results: dict[str, dict[str, list]] = {name: {} for name in sides}
        for _ in range(args.rounds):
            for name, targets in sides.items():
                for key, c in (("c1", 1), ("c32", 32)):
                    run = one_side(targets, c, args.seconds, args.requests if c == 1 else 10**6)
                    for field, value in run.items():
                        results[name].setdefault(f"{key} {field}", []).append(value)
    report(results, args)
    return 0


def median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def report(results: dict[str, dict[str, list]], args: argparse.Namespace) -> None:
    direct_p50 = median(results["direct"]["c1 p50_ms"])
    alone_rps = median(results["alone"]["c32 rps"])
    print(f"\n{args.rounds} interleaved rounds; medians (every round in brackets)\n")
    print(
        "| side | added p50, c=1, ms | CPU ms/request, c=1 | req/s, c=32 | × alone "
        "| CPU ms/request, c=32 | redis-server CPU ms/request, c=32 | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p50 = median(r["c1 p50_ms"])
        added = round(p50 - direct_p50, 3) if name != "direct" else "–"
        rps = median(r["c32 rps"])
        redis_ms = median(r["c32 redis_cpu_ms"])
        ratio = round(rps / alone_rps, 2) if name not in ("direct", "alone") else "–"
        print(
            f"| {name} | {added} | {median(r['c1 cpu_ms'])} | {rps} {r['c32 rps']} | {ratio} "
            f"| {median(r['c32 cpu_ms'])} | {redis_ms if 'redis' in name else '–'} "
            f"| {sum(r['c1 errors']) + sum(r['c32 errors'])} |"
        )
    print("\nCPU: the proxies' own (user + system, /proc), summed over replicas; the client")
    print("and the fake share the same 2 cores, so req/s is a ratio within the run.")


if __name__ == "__main__":
    sys.exit(main())
