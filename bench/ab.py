"""Two versions of the proxy side by side: interleaved runs against one fake backend.

    git worktree add /tmp/before 766a501
    python -m bench.ab /tmp/before . [--concurrency 32] [--rounds 4] [--seconds 3]

Each tree's proxy runs from that tree (PYTHONPATH), all in front of the same fake. The
rounds alternate direct, first tree, second tree, so a machine that speeds up or slows
down between minutes moves every column alike; each cell lists every round. The load
comes from wrk when it is installed, else from this process (bench/measure.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from gevent import monkey

monkey.patch_all()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure, servers  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs=2, help="two checkouts of ollamamq")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    return parser.parse_args(argv)


def start_proxies(trees: list[str], backend: str) -> list[servers.Server]:
    """One proxy per tree, each importing ollamamq from its own tree."""
    started = []
    for tree in trees:
        os.environ["PYTHONPATH"] = str(Path(tree).resolve())
        started.append(servers.start_proxy(backend, 4, []))
    os.environ.pop("PYTHONPATH")
    return started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fake = servers.start_fake(tokens=1)
    proxies = start_proxies(args.trees, fake.url)
    sides = [("direct", fake), *zip(args.trees, proxies, strict=True)]
    runs: dict[str, list[dict]] = {name: [] for name, _ in sides}
    try:
        for _ in range(args.rounds):
            for name, server in sides:
                run = measure.throughput(server.url, args.concurrency, args.seconds, server.pid)
                runs[name].append(run)
    finally:
        for server in (*proxies, fake):
            servers.stop(server)
    client = runs["direct"][0]["client"]
    print(f"c={args.concurrency}, {args.rounds} rounds of {args.seconds:.0f} s, {client} client")
    for name, results in runs.items():
        cpu = [r["cpu_ms"] for r in results]
        rps = [round(r["rps"]) for r in results]
        p50 = [r.get("p50_ms") for r in results]
        print(f"{name}: CPU ms/request median {statistics.median(cpu):.3f} {cpu}")
        print(f"    req/s {rps}  p50 ms {p50}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
