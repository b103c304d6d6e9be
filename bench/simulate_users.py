"""Several users burst streamed chats at the proxy at once; watch that nobody starves.

    python -m bench.simulate_users --spawn                 # own fake (10 ms/token) + proxy
    python -m bench.simulate_users --url http://127.0.0.1:11435 --bursts 10,2,2,2

The heaviest user starts first; with fair queueing the light users still finish early.
"""

# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import gevent

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `python bench/...py`

from bench import servers
from bench.client import Reply, chat, connect, fetch


@dataclass(frozen=True)
class Done:
    """One finished request, in the order requests finished."""

    position: int
    user: str
    number: int
    reply: Reply


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.simulate_users", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:11435", help="a running proxy")
    p.add_argument("--spawn", action="store_true", help="start a fake and a 1-slot proxy")
    p.add_argument("--users", type=int, default=4, help="number of users (4)")
    p.add_argument("--burst", type=int, default=2, help="user i sends burst*(i+1) requests")
    p.add_argument("--bursts", help="requests per user instead, e.g. 10,2,2,2")
    p.add_argument("--tokens", type=int, default=20, help="tokens per answer (20)")
    p.add_argument("--stagger", type=float, default=0.1, help="seconds between users' starts")
    p.add_argument(
        "--spacing", type=float, default=0.002, help="seconds between one user's requests"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this long")
    return p.parse_args(argv)


def bursts_of(args: argparse.Namespace) -> dict[str, int]:
    """Requests per user, heaviest first: that is also the order in which users start."""
    counts = [int(n) for n in args.bursts.split(",")] if args.bursts else None
    counts = counts or [args.burst * (i + 1) for i in range(args.users)]
    users = {f"user-{i + 1}": n for i, n in enumerate(counts)}
    return dict(sorted(users.items(), key=lambda item: -item[1]))


def spawn(stack: ExitStack, most: int) -> str:
    """A fake at 10 ms a token behind a proxy with one slot; returns the proxy's URL."""
    fake = servers.start_fake(token_delay=0.01)
    stack.callback(servers.stop, fake)
    room = ["--max-queue-per-user", str(most + 1)]
    proxy = servers.start_proxy(fake.url, 1, room)
    stack.callback(servers.stop, proxy)
    stack.callback(servers.remove_logs, [fake, proxy])
    return proxy.url


def simulate(url: str, bursts: dict[str, int], args: argparse.Namespace) -> list[Done]:
    """Start each user's burst, `stagger` apart; log requests as they finish."""
    log: list[Done] = []
    started = time.monotonic()

    def one(user: str, number: int) -> None:
        conn = connect(url, timeout=args.timeout)
        reply = fetch(conn, "/api/chat", chat(args.tokens, f"{user} #{number}"), user)
        conn.close()
        log.append(Done(len(log) + 1, user, number, reply))
        print(line(log[-1], bursts[user], time.monotonic() - started), flush=True)

    greenlets = []
    for user, count in bursts.items():
        for n in range(count):
            greenlets.append(gevent.spawn(one, user, n + 1))
            gevent.sleep(args.spacing)  # else connects finish in any order, and so do sends
        gevent.sleep(args.stagger)
    gevent.joinall(greenlets, timeout=args.timeout)
    gevent.killall(greenlets, timeout=1)
    return log


def line(done: Done, count: int, elapsed: float) -> str:
    """One completion: order, user, request number, queue wait, duration."""
    reply = done.reply
    wait = f"{reply.wait_ms:8.1f} ms" if reply.wait_ms is not None else "       — ms"
    status = "ok" if reply.ok else f"FAILED {reply.error[:60]}"
    return (
        f"{done.position:4d}  {elapsed:7.2f} s  {done.user:<8} req {done.number:>3}/{count:<3}"
        f"  wait {wait}  took {reply.seconds:6.3f} s  {status}"
    )


def summary(log: list[Done], bursts: dict[str, int]) -> list[str]:
    """Per user: requests, mean and max wait, and the positions of first and last finish."""
    rows = ["user      sent  ok  mean wait ms  max wait ms  finished at (first-last)"]
    for user, count in bursts.items():
        mine = [d for d in log if d.user == user]
        waits = [d.reply.wait_ms for d in mine if d.reply.wait_ms is not None] or [0.0]
        ok = sum(d.reply.ok for d in mine)
        spots = f"{mine[0].position}-{mine[-1].position}" if mine else "—"
        if len(mine) < count:
            spots += f" ({count - len(mine)} unfinished)"
        rows.append(
            f"{user:<8} {count:5d} {ok:3d}  {statistics.mean(waits):12.1f}"
            f"  {max(waits):11.1f}  {spots}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the users and print the completion log and the per-user summary."""
    args = parse_args(argv)
    bursts = bursts_of(args)
    with ExitStack() as stack:
        url = spawn(stack, max(bursts.values())) if args.spawn else args.url
        print(f"{sum(bursts.values())} requests to {url}: {bursts} (heaviest starts first)")
        print("   #  elapsed    user     request    queue wait        duration")
        log = simulate(url, bursts, args)
    print()
    print("\n".join(summary(log, bursts)))
    complete = len(log) == sum(bursts.values()) and all(d.reply.ok for d in log)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
