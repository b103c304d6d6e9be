"""The fake Ollama direct, behind nginx, and behind the proxy, side by side in one run.

    python bench/proxy_bench.py [--quick] [--json FILE] [--plot FILE] [--profile FILE]

The fakes, the proxies and nginx (when installed) run as subprocesses on loopback; the
load comes from wrk (when installed) and from this process, on gevent, with http.client
keep-alive connections. Every server is measured from outside: CPU from /proc/PID/stat,
peak memory from /proc/PID/status. Issue 11's table and its scale curve come out of one run.
"""

# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import json
import math
import os
import platform
import pstats
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `python bench/...py`

from bench import measure, scale, servers, wrk
from bench.report import tables
from bench.servers import Server

SLOTS = 4  # --backend-parallel of both proxies: the batch-job case of issue 11
SIDES = ("direct", "nginx", "proxy")
PLOT = Path(__file__).resolve().parent / "scale.png"


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run, and how long any one of them may take."""

    c1: int = 2000  # sequential requests for the added p50
    load_seconds: float = 5.0  # each wrk run (c=32 and the concurrency curve)
    concurrency: tuple[int, ...] = (1, 32, 256)
    ttfb: int = 200  # sequential streams of 20 tokens x 10 ms
    ttfb_tokens: int = 20
    token_delay: float = 0.01
    tokens: int = 500  # the relayed stream
    repeats: int = 5
    held: tuple[int, ...] = (1_000, 5_000, 10_000)  # streams held at once, SLOTS at a time
    grant_users: tuple[int, ...] = scale.USERS
    grant_budget: float = 0.2  # seconds per grant measurement
    limit: float = 60.0  # seconds any one measurement may take


QUICK = Plan(
    c1=100,
    load_seconds=1.0,
    concurrency=(1, 32),
    ttfb=20,
    repeats=2,
    held=(100, 200),
    grant_users=(10, 1_000),
    grant_budget=0.02,
    limit=10.0,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python bench/proxy_bench.py", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a tiny run, for a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--plot", metavar="FILE", default=str(PLOT), help=f"the PNG ({PLOT.name})")
    p.add_argument("--profile", metavar="FILE", help="run the c=32 proxy under cProfile")
    return p.parse_args(argv)


def raise_fd_limit(needed: int) -> None:
    """Raise this process's (and so the servers') soft descriptor limit as far as needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def start_servers(plan: Plan, profile: str, stack: ExitStack) -> dict[str, dict[str, Server]]:
    """Per side, a server in front of the quick fake and one in front of the paced fake."""

    def started(server: Server | None) -> Server | None:
        if server is not None:
            stack.callback(servers.stop, server)
        return server

    quick = started(servers.start_fake(tokens=1))
    paced = started(servers.start_fake(tokens=1, token_delay=plan.token_delay, name="paced"))
    room = 2 * max(plan.held)
    queue = ["--max-queue-per-user", str(room), "--max-queue", str(room)]
    sides = {
        "direct": {"quick": quick, "paced": paced},
        "proxy": {
            "quick": started(servers.start_proxy(quick.url, SLOTS, queue, profile)),
            "paced": started(servers.start_proxy(paced.url, SLOTS, queue, name="proxy-paced")),
        },
    }
    nginx = started(servers.start_nginx(quick.url))
    if nginx is not None:
        sides["nginx"] = {"quick": nginx, "paced": started(servers.start_nginx(paced.url))}
    return sides


def run(plan: Plan, sides: dict[str, dict[str, Server]]) -> dict[str, Any]:
    """The table's measurements on each side, then the scale curve."""

    def deadline() -> float:
        return time.monotonic() + plan.limit

    results: dict[str, Any] = {side: {} for side in sides}
    for side, (quick, paced) in ((s, (v["quick"], v["paced"])) for s, v in sides.items()):
        out = results[side]
        out["c32"] = measure.throughput(quick.url, 32, plan.load_seconds, quick.pid)
        out["c1"] = measure.sequential_latency(
            quick.url, plan.c1, plan.load_seconds, deadline(), quick.pid
        )
        out["ttfb"] = measure.first_byte(paced.url, plan.ttfb, plan.ttfb_tokens, deadline())
        out["relay"] = measure.chunk_rate(quick.url, plan.tokens, plan.repeats, deadline())
    one = measure.stream_seconds(sides["direct"]["paced"].url, 20, deadline())
    results["held"] = [held(sides["proxy"]["paced"], n, one, plan.limit) for n in plan.held]
    results["cpu"] = {side: [] for side in sides if side != "direct"}
    for side, points in results["cpu"].items():
        quick = sides[side]["quick"]
        for c in plan.concurrency:
            point = results[side]["c32"] if c == 32 else None
            points.append(point or measure.throughput(quick.url, c, plan.load_seconds, quick.pid))
    results["grant"] = scale.grant_curve(plan.grant_budget, plan.grant_users)
    return results


def held(server: Server, clients: int, one: float | None, limit: float) -> dict[str, Any]:
    """`clients` one-token streams at once through SLOTS slots; wall time against ideal.

    The run may take four times the ideal (at least `limit`): 10,000 clients need longer
    than any other measurement.
    """
    ideal = math.ceil(clients / SLOTS) * one if one else None
    end = time.monotonic() + max(limit, 4 * (ideal or 0))
    result = measure.many_streams(server.url, clients, clients, end, server.pid)
    ratio = round(result["seconds"] / ideal, 3) if ideal else None
    return result | {"clients": clients, "ideal_seconds": ideal, "wall_vs_ideal": ratio}


def notes(plan: Plan, sides: dict[str, dict[str, Server]], results: dict[str, Any]) -> list[str]:
    """What the reader needs to know to interpret the tables."""
    load = "wrk -t1" if wrk.available() else "this process (wrk is not installed)"
    lines = [
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; every server "
        "is a separate process on loopback; the proxies run with "
        f"--backend-parallel {SLOTS}, one user (X-User-ID: bench)",
        f"req/s and CPU: {load}, {plan.load_seconds:.0f} s per run, a 1-token /api/generate; "
        "CPU per request is the server's own utime+stime from /proc/PID/stat",
        f"p50: sequential requests on one keep-alive connection ({load}, or {plan.c1} from "
        "this process without wrk); first byte: "
        f"{plan.ttfb} streams of {plan.ttfb_tokens} tokens, {plan.token_delay * 1000:.0f} ms "
        f"before each; lines/s: {plan.repeats} unpaced streams of {plan.tokens} tokens",
        "held: N one-token streams sent at once, one user each; ideal = ceil(N/4) x one "
        "stream's direct duration; RSS is the proxy's VmHWM (peak since start, so the "
        "rows run in increasing N)",
    ]
    if "nginx" not in sides:
        lines.append("nginx is not installed: its column is empty")
    for server in (s for side in sides.values() for s in side.values()):
        problems = server.problems()
        if problems:
            lines.append(f"{server.name} logged {len(problems)} warnings/errors, first: ")
            lines.extend(f"    {line}" for line in problems[:5])
    return lines


def print_profile(path: str, count: int = 25) -> None:
    """The proxy's heaviest functions, by own time and by cumulative time."""
    if not Path(path).exists():
        print(f"\nno profile was written to {path}")
        return
    for order in ("tottime", "cumulative"):
        print(f"\n## proxy profile, top {count} by {order}\n")
        pstats.Stats(path, stream=sys.stdout).sort_stats(order).print_stats(count)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables, the notes and the raw numbers; draw the plot."""
    args = parse_args(argv)
    plan = QUICK if args.quick else Plan()
    raise_fd_limit(2 * max(plan.held) + 1024)
    with ExitStack() as stack:
        sides = start_servers(plan, args.profile or "", stack)
        results = run(plan, sides)
        lines = notes(plan, sides, results)
        all_servers = [s for side in sides.values() for s in side.values()]
    results["plan"] = asdict(plan)
    print(tables(results))
    print()
    print("\n".join(f"- {line}" for line in lines))
    servers.remove_logs(all_servers)
    plotted = scale.plot(results, Path(args.plot))
    print(f"\nplot: {plotted}" if plotted else "\nno plot: matplotlib is not installed")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.profile:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
