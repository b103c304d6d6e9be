"""Direct to the fake Ollama versus through the proxy: latency, first byte, relay, many clients.

    python -m bench.proxy_bench [--quick] [--json FILE] [--only c1,c32,ttfb,chunks,clients]

The fake and the proxy run as subprocesses; the load comes from this process, on gevent,
with http.client keep-alive connections. The "direct" column is what this client gets from
the fake alone, so the client's own cost is visible there.
"""

# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import json
import os
import platform
import pstats
import resource
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `python bench/...py`

from bench import measure, servers
from bench.report import table
from bench.servers import Server

MEASUREMENTS = ("c1", "c32", "ttfb", "chunks", "clients")
LATENCY_SLOTS = 32  # (a)-(c): enough slots that c=32 is queued but never serialized
STREAM_SLOTS = 8  # (d): the proxy queues whatever does not fit in 8 slots
SERVED_BY = {"clients": "streams"}  # the proxy that serves (d); "proxy" serves the others


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run, and how long any one of them may take."""

    c1: int = 2000
    c32: int = 10_000
    concurrency: int = 32
    ttfb: int = 300
    tokens: int = 2000
    repeats: int = 5
    clients: int = 2000
    users: int = 0  # X-User-IDs among the clients of (d); 0: one per client
    limit: float = 30.0  # seconds any one measurement may take
    budget: float = 150.0  # seconds all of them together may take


QUICK = Plan(c1=100, c32=640, ttfb=30, repeats=2, clients=200, limit=2.0, budget=12.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.proxy_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a tiny run, for a smoke test")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--proxy-url", help="use this running proxy (for every measurement)")
    p.add_argument("--backend-url", help="use this running fake (default: the proxy's backend)")
    p.add_argument("--only", default=",".join(MEASUREMENTS), help="comma list of measurements")
    p.add_argument("--clients", type=int, help="streaming clients in (d) (2000)")
    p.add_argument("--users", type=int, help="distinct users among them (one per client)")
    p.add_argument("--profile", metavar="FILE", help="run the spawned proxy under cProfile")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(MEASUREMENTS)
    if unknown:
        p.error(f"unknown measurements {sorted(unknown)}; choose from {MEASUREMENTS}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan the flags ask for."""
    plan = QUICK if args.quick else Plan()
    if args.clients:
        plan = replace(plan, clients=args.clients)
    return replace(plan, users=args.users or plan.clients)


def raise_fd_limit(needed: int) -> None:
    """Raise this process's (and so the servers') soft descriptor limit as far as needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def start_servers(
    args: argparse.Namespace, plan: Plan, only: set[str], stack: ExitStack
) -> dict[str, Server]:
    """The fake, a proxy for (a)-(c) and a proxy for (d): started here unless given."""
    if args.proxy_url:
        proxy = servers.external("proxy", args.proxy_url)
        backend = args.backend_url or servers.backend_of(proxy.url)
        return {"fake": servers.external("fake", backend), "proxy": proxy, "streams": proxy}
    fake = servers.external("fake", args.backend_url) if args.backend_url else None
    if fake is None:
        fake = servers.start_fake()
        stack.callback(servers.stop, fake)
    proxy = servers.start_proxy(fake.url, LATENCY_SLOTS, [], args.profile or "")
    stack.callback(servers.stop, proxy)
    procs = {"fake": fake, "proxy": proxy}
    if "clients" in only:
        room = ["--max-queue-per-user", str(plan.clients), "--max-queue", str(2 * plan.clients)]
        procs["streams"] = servers.start_proxy(fake.url, STREAM_SLOTS, room)
        stack.callback(servers.stop, procs["streams"])
    return procs


class Budget:
    """Deadlines for the measurements: each gets `limit` seconds, all share `total`."""

    def __init__(self, limit: float, total: float) -> None:
        self.limit = limit
        self.end = time.monotonic() + total

    def deadline(self) -> float | None:
        """The next measurement's deadline, or None once the whole budget is spent."""
        now = time.monotonic()
        return min(now + self.limit, self.end) if now < self.end - 0.2 else None


def run(plan: Plan, only: set[str], procs: dict[str, Server]) -> dict[str, Any]:
    """Each chosen measurement, direct first, then through the proxy."""
    results: dict[str, Any] = {"direct": {}, "proxy": {}, "skipped": []}
    budget = Budget(plan.limit, plan.budget)
    jobs = {
        "c1": lambda s, end, pids: measure.latency(s.url, plan.c1, 1, end, pids),
        "c32": lambda s, end, pids: measure.latency(s.url, plan.c32, plan.concurrency, end, pids),
        "ttfb": lambda s, end, pids: measure.first_byte(s.url, plan.ttfb, end),
        "chunks": lambda s, end, pids: measure.chunk_rate(s.url, plan.tokens, plan.repeats, end),
        "clients": lambda s, end, pids: measure.many_streams(
            s.url, plan.clients, plan.users, end, s.pid
        ),
    }
    pids = {"client": os.getpid(), "fake": procs["fake"].pid}
    sides = {"direct": pids, "proxy": pids | {"proxy": procs["proxy"].pid}}
    for name in (name for name in MEASUREMENTS if name in only):
        for side, watched in sides.items():
            server = procs["fake"] if side == "direct" else procs[SERVED_BY.get(name, "proxy")]
            end = budget.deadline()
            if end is None:
                results["skipped"].append(f"{name} {side}")
            else:
                results[side][name] = jobs[name](server, end, watched)
    return results


def notes(
    plan: Plan, args: argparse.Namespace, procs: dict[str, Server], results: dict[str, Any]
) -> list[str]:
    """What the reader needs to know to interpret the table."""
    users = "one X-User-ID per client" if plan.users == plan.clients else f"{plan.users} users"
    slots = "" if args.proxy_url else f"; proxy run with --backend-parallel {LATENCY_SLOTS}"
    wide = "" if args.proxy_url else f"; proxy run with --backend-parallel {STREAM_SLOTS}"
    described = {
        "c1": f"(a) c=1: {plan.c1} requests on one keep-alive connection",
        "c32": f"(a) c={plan.concurrency}: {plan.c32} requests, one user per client{slots}",
        "ttfb": f"(b) {plan.ttfb} sequential streams of 16 tokens, first body byte",
        "chunks": f"(c) {plan.repeats} streams of {plan.tokens} tokens, first byte to last",
        "clients": f"(d) {plan.clients} streams of 8 tokens sent at once, {users}{wide}; "
        "the direct column is the fake serving all at once (RSS is the fake's)",
    }
    lines = [
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        "client, fake and proxy are separate processes on loopback",
        "client: this process, gevent + http.client, one keep-alive connection per client",
        *(text for name, text in described.items() if name in results["plan"]["only"]),
    ]
    if results["skipped"]:
        lines.append(f"not run, time budget spent: {', '.join(results['skipped'])}")
    for server in {id(s): s for s in procs.values()}.values():
        problems = server.problems()
        if problems:
            lines.append(f"{server.name} logged {len(problems)} warnings/errors, first: ")
            lines.extend(f"    {line}" for line in problems[:5])
    return lines


def print_profile(path: str, count: int = 15) -> None:
    """The proxy's heaviest functions, by cumulative and by own time."""
    if not Path(path).exists():
        print(f"\nno profile was written to {path}")
        return
    for order in ("cumulative", "tottime"):
        print(f"\n## proxy profile, top {count} by {order}\n")
        pstats.Stats(path, stream=sys.stdout).sort_stats(order).print_stats(count)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table and the raw numbers."""
    args = parse_args(argv)
    plan = make_plan(args)
    only = set(args.only.split(","))
    raise_fd_limit(2 * plan.clients + 1024)
    with ExitStack() as stack:
        procs = start_servers(args, plan, only, stack)
        results = run(plan, only, procs)
    results["plan"] = asdict(plan) | {"only": sorted(only)}
    print(table(results))
    print()
    print("\n".join(f"- {line}" for line in notes(plan, args, procs, results)))
    servers.remove_logs(procs.values())
    print()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.profile and not args.proxy_url:
        print_profile(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
