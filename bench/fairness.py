"""One heavy user and four light ones, under `requests` and under `tokens` fairness.

    python -m bench.fairness [--quick] [--seconds 20] [--slots 1] [--backends 1] [--replicas 1]
                             [--json FILE]

Fake backends whose generation time grows with the tokens asked for sit behind a proxy
started afresh for each mode. Every user keeps a fixed number of streamed chats outstanding
(closed loop), so by default every user is backlogged all the time. With --replicas N, N
proxies share one queue through a redis-server: the heavy user goes through the first, the
light ones through the others. The load runs through a warm-up,
the measured window and a short tail, and tokens count in proportion to the slot time
they took inside the window. Targets: Jain's index ≥ 0.95 on token service under `tokens`;
light users' p95 queue wait at most one heavy request's duration; `tokens` throughput
within 2% of `requests`.
"""

# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import json
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Group

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for `python bench/...py`

from bench import servers
from bench.client import READ_SIZE, TAIL_BYTES, chat, connect, percentile
from bench.report import number
from bench.servers import Server
from tests.real_servers import redis_server

log = logging.getLogger("bench.fairness")

MODES = ("requests", "tokens")
SCENARIOS = ("heavy", "rotating", "aborter", "usageless")
ABORT_AT = 0.95  # aborter: the share of each answer read before hanging up
OPENAI_PATH = "/v1/chat/completions"  # usageless: OpenAI streams, the fake reports no usage
CONTENT = {False: b'"done":false', True: b'"finish_reason":null'}  # one per token
ROTATING_OUTSTANDING = 6  # the rotating-id attacker's requests in flight
LIGHT_SHARE_TARGET = 0.10  # rotating: the light user's share of completed requests
PROMPT = "please answer at exactly the length the options ask for"  # the same for every user
MAX_REQUESTS = 100_000  # per greenlet: a bound besides the window's end
MAX_QUEUE = 1000  # --max-queue-per-user: the heavy user's backlog must never be refused
ERROR_PAUSE = 0.05  # seconds a greenlet rests after a failed request, so it cannot spin
KILL_TIMEOUT = 5.0
KEY_RELOAD_WAIT = 1.5  # seconds until a running proxy has read keys made by the CLI
TAIL = 0.5  # seconds of load after the window, besides two heavy requests' worth
JAIN_TARGET = 0.95
BACKLOGGED_PCT = 99.0  # a user with a request outstanding this much of the window is backlogged
THROUGHPUT_TARGET = 0.98  # `tokens` output tokens/s over `requests` output tokens/s
EXCEPTION = re.compile(r"^\w+(Error|Exception): |.*\b(ERROR|CRITICAL)\b")  # in a server's log


@dataclass(frozen=True)
class User:
    """One simulated user: requests kept outstanding, and tokens asked of each."""

    name: str
    outstanding: int
    tokens: int
    think: float = 0.0  # seconds between a reply and the next request; 0: always backlogged
    rotate: bool = False  # a fresh X-User-ID for every request (ids cost nothing without keys)
    abort_at: float = 0.0  # hang up once this share of the answer's records is read; 0: never
    key: str = ""  # with --keys: the user's own API key, sent with every request


@dataclass(frozen=True)
class Window:
    """The measured stretch of time after the warm-up, in time.monotonic() seconds."""

    start: float
    end: float

    def overlap(self, since: float, until: float) -> float:
        """Seconds of [since, until) inside the window."""
        return max(0.0, min(until, self.end) - max(since, self.start))


@dataclass(frozen=True)
class Done:
    """One finished request as the client saw it."""

    started: float
    ended: float
    seconds: float  # from sending to the last byte
    wait_s: float | None  # the proxy's X-Queue-Wait-Ms
    tokens_in: int
    tokens_out: int
    ok: bool
    error: str = ""

    def share_in(self, window: Window) -> float:
        """The part of its slot time (grant to last byte) that fell inside the window."""
        granted = self.started + (self.wait_s or 0.0)
        if self.ended <= granted:
            return 1.0 if window.start <= self.ended < window.end else 0.0
        return window.overlap(granted, self.ended) / (self.ended - granted)


class Occupancy:
    """Seconds of the window during which a count was at least 1; no method yields."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.count = 0
        self.since = 0.0
        self.seconds = 0.0

    def enter(self) -> None:
        """One more; the clock starts if it was the first."""
        if self.count == 0:
            self.since = time.monotonic()
        self.count += 1

    def leave(self) -> None:
        """One fewer; the time since the first is banked when none is left."""
        self.count -= 1
        if self.count == 0:
            self.seconds += self.window.overlap(self.since, time.monotonic())

    def percent(self) -> float:
        """Share of the window covered, intervals still open included."""
        still = self.window.overlap(self.since, self.window.end) if self.count else 0.0
        return round(100 * (self.seconds + still) / (self.window.end - self.window.start), 1)


@dataclass
class Track:
    """One user's record: finished requests, time with any outstanding, time with any queued."""

    window: Window
    done: list[Done] = field(default_factory=list)
    busy: Occupancy = field(init=False)  # sent and not yet read to the end
    queued: Occupancy = field(init=False)  # sent, response headers not yet back: in the queue

    def __post_init__(self) -> None:
        self.busy, self.queued = Occupancy(self.window), Occupancy(self.window)

    def counted(self) -> list[Done]:
        """Requests that completed inside the window."""
        return [d for d in self.done if self.window.start <= d.ended < self.window.end]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a 4 s window, for a smoke test")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per mode (20)")
    p.add_argument("--warmup", type=float, help="seconds before the window (2; --quick 1)")
    p.add_argument("--slots", type=int, default=1, help="slots per backend (1)")
    p.add_argument("--backends", type=int, default=1, help="fake backends (1)")
    p.add_argument(
        "--replicas", type=int, default=1, help="proxies sharing one queue through Redis (1)"
    )
    p.add_argument("--token-delay", type=float, default=0.002, help="seconds a token (0.002)")
    p.add_argument("--heavy-outstanding", type=int, default=10, help="heavy requests kept (10)")
    p.add_argument("--heavy-tokens", type=int, default=200, help="tokens a heavy answer (200)")
    p.add_argument("--light-users", type=int, default=4, help="light users (4)")
    p.add_argument("--light-outstanding", type=int, help="each light user keeps (2; rotating: 1)")
    p.add_argument("--light-tokens", type=int, default=20, help="tokens a light answer (20)")
    p.add_argument(
        "--light-think",
        type=float,
        default=0.0,
        help="mean seconds a light user thinks between requests (0: always backlogged)",
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fairness modes")
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="heavy",
        help="heavy: one heavy user, light ones; rotating: a fresh id per request "
        "(6 outstanding) against one light user with 1 outstanding; aborter: a user that "
        "hangs up at 95%% of each answer against an honest one, both --heavy-tokens; "
        "usageless: heavy, light, over OpenAI streams from a backend that reports no usage",
    )
    p.add_argument(
        "--keys",
        action="store_true",
        help="give every user an API key of its own (ollamamq keys create): ids then cost",
    )
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 4.0
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.light_outstanding is None:
        args.light_outstanding = 1 if args.scenario == "rotating" else 2
    args.modes = [m for m in MODES if m in args.modes.split(",")]
    if not args.modes or min(args.slots, args.backends, args.replicas, args.seconds) <= 0:
        p.error("need a known mode, and positive --slots, --backends, --replicas, --seconds")
    return args


def users_of(args: argparse.Namespace) -> list[User]:
    """The heavy user (or attacker) first, then the light ones."""
    if args.scenario == "rotating":
        attacker = User("rotating", ROTATING_OUTSTANDING, args.light_tokens, rotate=True)
        return [attacker, User("light-1", args.light_outstanding, args.light_tokens)]
    if args.scenario == "aborter":
        tokens = args.heavy_tokens
        return [User("aborter", 2, tokens, abort_at=ABORT_AT), User("honest", 2, tokens)]
    light = [
        User(f"light-{i + 1}", args.light_outstanding, args.light_tokens, args.light_think)
        for i in range(args.light_users)
    ]
    return [User("heavy", args.heavy_outstanding, args.heavy_tokens), *light]


def exchange(
    conn: HTTPConnection, path: str, body: bytes, name: str, user: User, track: Track
) -> Done:
    """One streamed chat, read to its end (or abandoned), its queued and in-flight time tracked."""
    started = time.monotonic()
    track.busy.enter()
    track.queued.enter()
    queued = True
    marker, limit = CONTENT[path == OPENAI_PATH], int(user.abort_at * user.tokens)
    try:
        auth = {"Authorization": f"Bearer {user.key}"} if user.key else {}
        conn.request("POST", path, body, {"X-User-ID": name, **auth})
        response = conn.getresponse()
        track.queued.leave()
        queued = False
        tail, records = b"", 0
        while data := response.read1(READ_SIZE):
            tail = (tail + data)[-TAIL_BYTES:]
            records += data.count(marker)
            if limit and records >= limit:
                conn.close()  # the client hangs up: it read what it wanted
                return abandoned(started, response, records)
    except (OSError, HTTPException) as exc:
        conn.close()
        now = time.monotonic()
        return Done(started, now, now - started, None, 0, 0, False, repr(exc))
    except BaseException:
        conn.close()  # killed after the tail, mid-request
        raise
    finally:
        if queued:
            track.queued.leave()
        track.busy.leave()
    if path == OPENAI_PATH:
        return finished_sse(started, response, tail, records)
    return finished(started, response, tail)


def queue_wait(response: HTTPResponse) -> float | None:
    """The proxy's X-Queue-Wait-Ms, in seconds."""
    wait = response.getheader("X-Queue-Wait-Ms")
    return float(wait) / 1000 if wait else None


def abandoned(started: float, response: HTTPResponse, records: int) -> Done:
    """A stream the client hung up on: what it read counts as its service."""
    ended = time.monotonic()
    return Done(started, ended, ended - started, queue_wait(response), 0, records, True)


def finished_sse(started: float, response: HTTPResponse, tail: bytes, records: int) -> Done:
    """An OpenAI stream read to [DONE]; without usage, its tokens are its content chunks."""
    ended = time.monotonic()
    ok = response.status == 200 and tail.rstrip().endswith(b"data: [DONE]")
    error = "" if ok else f"{response.status}: {tail[-200:].decode(errors='replace')}"
    return Done(started, ended, ended - started, queue_wait(response), 0, records, ok, error)


def finished(started: float, response: HTTPResponse, tail: bytes) -> Done:
    """The Done of a response read to its end, token counts from its final record."""
    ended = time.monotonic()
    try:
        record = json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except ValueError:
        record = {}
    record = record if isinstance(record, dict) else {}
    ok = response.status == 200 and record.get("done") is True and "error" not in record
    error = "" if ok else f"{response.status}: {tail[-200:].decode(errors='replace')}"
    tokens_in, tokens_out = record.get("prompt_eval_count", 0), record.get("eval_count", 0)
    wait_s = queue_wait(response)
    return Done(started, ended, ended - started, wait_s, tokens_in, tokens_out, ok, error)


def openai_chat(tokens: int) -> bytes:
    """A streamed OpenAI chat body asking for `tokens` tokens."""
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": "llama3", "messages": messages, "stream": True}
    return json.dumps(body | {"max_tokens": tokens}).encode()


def worker(url: str, user: User, track: Track, until: float, seed: str, api: str) -> None:
    """Keep one request of `user` outstanding until `until`, thinking between if asked."""
    conn = connect(url)
    openai = api == "openai"
    path = OPENAI_PATH if openai else "/api/chat"
    body = openai_chat(user.tokens) if openai else chat(user.tokens, PROMPT)
    thinking = random.Random(seed)  # exponential think times: users must not move in step
    try:
        for n in range(MAX_REQUESTS):
            if time.monotonic() >= until:
                break
            name = f"{seed}-{n}" if user.rotate else user.name
            track.done.append(exchange(conn, path, body, name, user, track))
            pause = thinking.expovariate(1 / user.think) if user.think else 0.0
            pause = pause if track.done[-1].ok else max(pause, ERROR_PAUSE)
            gevent.sleep(min(pause, max(0.0, until - time.monotonic())))
    finally:
        conn.close()


def crashed(greenlet: gevent.Greenlet) -> None:
    """Say that a load greenlet died, rather than let its user go quiet unnoticed."""
    log.error("%s died: %r", greenlet.name, greenlet.exception)


def entry(urls: list[str], index: int) -> str:
    """The proxy user `index` goes through: the first user (heavy) the first, the others
    the rest in turn; everyone the only one if there is one."""
    if index == 0 or len(urls) == 1:
        return urls[0]
    return urls[1 + (index - 1) % (len(urls) - 1)]


def load(urls: list[str], users: list[User], args: argparse.Namespace) -> dict[str, Track]:
    """Every user's greenlets, through warm-up, window and tail, then killed mid-request.

    The tail lets the requests holding a slot at the window's end finish, so that the part
    of their tokens made inside the window is known.
    """
    now = time.monotonic()
    window = Window(now + args.warmup, now + args.warmup + args.seconds)
    until = window.end + 2 * args.heavy_tokens * args.token_delay + TAIL
    tracks = {user.name: Track(window) for user in users}
    group = Group()
    try:
        for index, user in enumerate(users):
            url = entry(urls, index)
            for i in range(user.outstanding):
                name = f"fairness-{user.name}-{i}"
                api = "openai" if args.scenario == "usageless" else "ollama"
                greenlet = group.spawn(worker, url, user, tracks[user.name], until, name, api)
                greenlet.name = name
                greenlet.link_exception(crashed)
        group.join(timeout=max(0.0, until - time.monotonic()))
    finally:
        group.kill(timeout=KILL_TIMEOUT)
    return tracks


def proxy_users(url: str) -> list[dict[str, Any]]:
    """The proxy's own per-user counters from /admin/api/users ([] if it will not say)."""
    password = os.environ.get("OLLAMAMQ_ADMIN_PASSWORD")
    headers = {"Authorization": f"Bearer {password}"} if password else {}
    conn = connect(url, timeout=5.0)
    try:
        conn.request("GET", "/admin/api/users", headers=headers)
        response = conn.getresponse()
        data = response.read()
        return json.loads(data)["users"] if response.status == 200 else []
    except (OSError, HTTPException, ValueError, KeyError):
        return []
    finally:
        conn.close()


def jain(values: list[float]) -> float | None:
    """Jain's fairness index (Σx)² / (n·Σx²): 1 when all are equal, 1/n when one has all."""
    squares = sum(v * v for v in values)
    return round(sum(values) ** 2 / (len(values) * squares), 4) if squares else None


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, as disjoint ones in order."""
    union: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def waits_behind_others(track: Track) -> list[float]:
    """Seconds each request was first in its user's queue while other users held the slots.

    A closed-loop user with k requests outstanding queues the later ones behind its own
    earlier ones: that part of a wait is its own doing. Each user's queue is FIFO, so a
    request is first once the grant before its own (in grant order: requests sent together
    may arrive in any order) is made; time the user's own requests held a slot is taken off.
    """
    timed = [d for d in track.done if d.ok and d.wait_s is not None]
    timed.sort(key=lambda d: d.started + d.wait_s)
    served = merged([(d.started + d.wait_s, d.ended) for d in timed])
    waits, ahead_granted = [], 0.0
    for d in timed:
        first, granted = max(d.started, ahead_granted), d.started + d.wait_s
        ahead_granted = granted
        if track.window.start <= d.ended < track.window.end:
            own = sum(max(0.0, min(end, granted) - max(start, first)) for start, end in served)
            waits.append(max(0.0, granted - first - own))
    return waits


def slot_costs(done: list[Done]) -> tuple[float | None, float | None]:
    """Slot ms per request and per token: a line through (tokens out - 1, service time)."""
    points = [(d.tokens_out - 1, d.seconds - d.wait_s) for d in done if d.wait_s is not None]
    if len({x for x, _ in points}) < 2:
        return None, None
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return round(intercept * 1000, 2), round(slope * 1000, 4)


def user_row(user: User, track: Track) -> dict[str, Any]:
    """One user's completed requests, tokens, queue waits and backlog in the window."""
    counted = track.counted()
    good = [d for d in counted if d.ok]
    waits = [d.wait_s * 1000 for d in good if d.wait_s is not None]
    shares = [(d, d.share_in(track.window)) for d in track.done if d.ok]
    tokens_in = round(sum(d.tokens_in * share for d, share in shares), 1)
    tokens_out = round(sum(d.tokens_out * share for d, share in shares), 1)
    return {
        "user": user.name,
        "outstanding": user.outstanding,
        "tokens_asked": user.tokens,
        "completed": len(good),
        "errors": len(counted) - len(good),
        "error_kinds": sorted({d.error[:80] for d in counted if not d.ok})[:3],
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "tokens": round(tokens_in + tokens_out, 1),
        "tokens_of_completed": sum(d.tokens_in + d.tokens_out for d in good),
        "wait_p50_ms": percentile(waits, 0.50),
        "wait_p95_ms": percentile(waits, 0.95),
        "behind_others_p95_ms": percentile([w * 1000 for w in waits_behind_others(track)], 0.95),
        "busy_pct": track.busy.percent(),
        "queued_pct": track.queued.percent(),
    }


def summarize(users: list[User], tracks: dict[str, Track], seconds: float) -> dict[str, Any]:
    """Per-user rows and the mode's fairness, throughput and light-user wait."""
    rows = [user_row(user, tracks[user.name]) for user in users]
    backlogged = [r for r in rows if r["busy_pct"] >= BACKLOGGED_PCT]
    total = sum(r["tokens"] for r in rows)
    completed = sum(r["completed"] for r in rows)
    for r in rows:
        r["share_pct"] = round(100 * r["tokens"] / total, 1) if total else 0.0
        r["request_share_pct"] = round(100 * r["completed"] / completed, 1) if completed else 0.0
    done = [d for t in tracks.values() for d in t.counted() if d.ok and d.wait_s is not None]
    heavy = [d for d in tracks[users[0].name].counted() if d.ok and d.wait_s is not None]
    light = [d for u in users[1:] for d in tracks[u.name].counted() if d.ok]
    light_waits = [d.wait_s for d in light if d.wait_s is not None]
    behind = [w for u in users[1:] for w in waits_behind_others(tracks[u.name])]
    heavy_s = statistics.mean(d.seconds - d.wait_s for d in heavy) if heavy else None
    light_p95, behind_p95 = percentile(light_waits, 0.95), percentile(behind, 0.95)
    per_request_ms, per_token_ms = slot_costs(done)
    return {
        "users": rows,
        "backlogged_users": len(backlogged),
        "jain": jain([r["tokens"] for r in backlogged]),
        "jain_weighted": jain([r["tokens_in"] + 2 * r["tokens_out"] for r in backlogged]),
        "jain_requests": jain([r["completed"] for r in backlogged]),
        "light_request_share_pct": sum(r["request_share_pct"] for r in rows[1:]),
        "tokens_per_s": round(total / seconds, 1),
        "output_tokens_per_s": round(sum(r["tokens_out"] for r in rows) / seconds, 1),
        "requests_per_s": round(sum(r["completed"] for r in rows) / seconds, 1),
        "errors": sum(r["errors"] for r in rows),
        "heavy_duration_s": round(heavy_s, 3) if heavy_s is not None else None,
        "light_wait_p50_s": percentile(light_waits, 0.50),
        "light_wait_p95_s": light_p95,
        "light_p95_within_heavy": within(light_p95, heavy_s),
        "light_behind_others_p95_s": behind_p95,
        "light_behind_others_within_heavy": within(behind_p95, heavy_s),
        "slot_ms_per_request": per_request_ms,
        "slot_ms_per_token": per_token_ms,
    }


def within(wait: float | None, heavy: float | None) -> bool | None:
    """Whether a wait is at most one heavy request's duration (None if either is unknown)."""
    return None if wait is None or heavy is None else wait <= heavy


def exceptions(server: Server) -> list[str]:
    """The server's logged warnings, errors and exception lines, each once."""
    lines = server.log_path.read_text(errors="replace").splitlines() if server.log_path else []
    found = [line for line in lines if EXCEPTION.match(line) or "WARNING" in line]
    return list(dict.fromkeys(found))


def create_key(proxy: Server, user: str) -> str:
    """A key for `user` in the running proxy's database, made by the real CLI."""
    env = os.environ | {"DB_PATH": str(proxy.workdir / "ollamamq.db"), "LOG_FILE": ""}
    made = subprocess.run(
        [sys.executable, "-m", "ollamamq", "keys", "create", user],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return made.stdout.split()[-1]


def start_proxies(
    stack: ExitStack, backend: str, slots: int, extra: list[str], replicas: int
) -> list[Server]:
    """One proxy, or `replicas` sharing a redis-server and a database, stopped with `stack`."""
    if replicas == 1:
        return [_started(stack, servers.start_proxy(backend, slots, extra))]
    redis_url = stack.enter_context(redis_server())
    database = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "shared.db"
    return [
        _started(
            stack,
            servers.start_proxy(
                backend,
                slots,
                [*extra, "--redis-url", redis_url, "--replica-id", f"r{n}"],
                name=f"proxy{n}",
                database=database,
            ),
        )
        for n in range(replicas)  # one after another: the first makes the schema
    ]


def _started(stack: ExitStack, proxy: Server) -> Server:
    stack.callback(servers.remove_logs, [proxy])
    stack.callback(servers.stop, proxy)
    return proxy


def run_mode(mode: str, fakes: list[Server], args: argparse.Namespace) -> dict[str, Any]:
    """A fresh proxy in `mode` in front of the fakes, loaded for the warm-up and the window."""
    users = users_of(args)
    extra = [arg for fake in fakes[1:] for arg in ("-o", fake.url)]
    extra += ["--fairness", mode, "--max-queue-per-user", str(MAX_QUEUE)]
    with ExitStack() as stack:
        proxies = start_proxies(stack, fakes[0].url, args.slots, extra, args.replicas)
        proxy = proxies[0]
        if args.keys:
            users = [replace(u, key=create_key(proxy, u.name)) for u in users]
            gevent.sleep(KEY_RELOAD_WAIT)  # the proxy reads new keys every second
        tracks = load([p.url for p in proxies], users, args)
        counters = proxy_users(proxy.url)
        problems = [line for p in proxies for line in exceptions(p)]
    result = summarize(users, tracks, args.seconds)
    return result | {"proxy_users": counters, "proxy_problems": problems[:10]}


def cell(value: Any) -> str:
    """A figure for the table: a dash for None, yes or **no** for a bool."""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return number(value)


def user_table(result: dict[str, Any]) -> str:
    """Per-user rows of one mode."""
    keys = ["completed", "request_share_pct", "tokens", "tokens_out", "share_pct"]
    keys += ["wait_p50_ms", "wait_p95_ms", "behind_others_p95_ms", "busy_pct", "queued_pct"]
    header = "| user | kept × tokens | completed | requests % | tokens in+out | out | share % "
    header += "| wait p50 ms | wait p95 ms | p95 behind others ms | outstanding % | queued % |"
    lines = [header, "|" + "---|" * 12]
    for r in result["users"]:
        kept = f"{r['outstanding']} × {r['tokens_asked']}"
        lines.append(f"| {r['user']} | {kept} | {' | '.join(cell(r[k]) for k in keys)} |")
    return "\n".join(lines)


# (label, key in a mode's result, target text, key in targets())
SUMMARY: list[tuple[str, str, str, str | None]] = [
    (f"users backlogged (≥ {BACKLOGGED_PCT:g}% outstanding)", "backlogged_users", "", None),
    ("Jain's index over them, tokens in+out", "jain", f"≥ {JAIN_TARGET}", "jain"),
    ("Jain's index, in + 2·out (the proxy's measure)", "jain_weighted", "", None),
    ("Jain's index over them, completed requests", "jain_requests", "", None),
    ("light users' share of completed requests, %", "light_request_share_pct", "", None),
    ("throughput, output tokens/s", "output_tokens_per_s", "", None),
    ("throughput, tokens/s (in+out)", "tokens_per_s", "", None),
    ("requests/s", "requests_per_s", "", None),
    ("slot time per request, ms (fit)", "slot_ms_per_request", "", None),
    ("slot time per output token, ms (fit)", "slot_ms_per_token", "", None),
    ("heavy request duration, mean s", "heavy_duration_s", "", None),
    ("light users' wait p50, s", "light_wait_p50_s", "", None),
    ("light users' wait p95, s", "light_wait_p95_s", "≤ heavy duration", "light_wait"),
    ("light wait p95 behind others, s", "light_behind_others_p95_s", "", None),
    ("… behind others ≤ heavy duration", "light_behind_others_within_heavy", "", None),
    ("errors", "errors", "0", None),
]


def summary_table(results: dict[str, Any]) -> str:
    """Both modes side by side, with the targets judged on `tokens`."""
    modes, met = results["modes"], targets(results)
    lines = ["| measure | requests | tokens | target (tokens) | met |", "|---|---|---|---|---|"]
    for label, key, target, name in SUMMARY:
        values = " | ".join(cell(modes.get(m, {}).get(key)) for m in MODES)
        lines.append(f"| {label} | {values} | {target} | {cell(met[name]) if name else ''} |")
    for label, key, target in (
        ("throughput ratio tokens / requests, output", "throughput_ratio", THROUGHPUT_TARGET),
        ("throughput ratio tokens / requests, in+out", "throughput_ratio_in_out", None),
    ):
        judged = cell(met["throughput"]) if target else ""
        limit = f"≥ {target}" if target else ""
        lines.append(f"| {label} | | {cell(results.get(key))} | {limit} | {judged} |")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, bool | None]:
    """Each target met, missed, or None when its numbers were not measured."""
    tokens = results["modes"].get("tokens", {})
    ratio = results.get("throughput_ratio")
    return {
        "jain": None if tokens.get("jain") is None else tokens["jain"] >= JAIN_TARGET,
        "light_wait": tokens.get("light_p95_within_heavy"),
        "throughput": None if ratio is None else ratio >= THROUGHPUT_TARGET,
    }


def ratios(results: dict[str, Any]) -> None:
    """Throughput of `tokens` over `requests`, on output tokens and on all tokens."""
    if not set(MODES) <= results["modes"].keys():
        return
    requests, tokens = (results["modes"][m] for m in MODES)
    for name, key in (
        ("throughput_ratio", "output_tokens_per_s"),
        ("throughput_ratio_in_out", "tokens_per_s"),
    ):
        results[name] = round(tokens[key] / requests[key], 4) if requests[key] else None


NOTES = """
- {delay:g} ms per token, {warmup:g} s warm-up; completed and waits: requests that completed \
inside the window; tokens: prompt_eval_count + eval_count of each request's final record, \
pro-rated by the part of its slot time inside the window (one heavy request is about 2% \
of a 20 s window, as large as the throughput target)
- outstanding %: share of the window with ≥ 1 request sent and not yet read to the end; \
queued %: with ≥ 1 sent whose response headers were not back (waiting in the proxy)
- behind others: the part of a wait during which the request was first in its user's queue \
and none of the user's own requests held a slot (a closed-loop user also waits behind itself)
- slot time: a least-squares line through (output tokens - 1, service time) of all requests; \
its intercept is what each request costs a slot besides its tokens
- the throughput target is judged on output tokens/s: only output tokens cost the fake time, \
so prompt tokens would credit the mode that serves more requests"""


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The markdown tables and notes; the raw numbers to --json."""
    backends = f"{args.backends} backend(s) × {args.slots} slot(s), {args.replicas} proxies"
    for mode, result in results["modes"].items():
        print(f"\n### `{mode}` fairness: {args.seconds:g} s window, {backends}\n")
        print(user_table(result))
        if result["proxy_problems"]:
            lines = "; ".join(result["proxy_problems"][:3])
            print(f"\nthe proxy logged (the load ends by dropping requests mid-stream): {lines}")
    print("\n### Summary\n")
    print(summary_table(results))
    print(NOTES.format(delay=args.token_delay * 1000, warmup=args.warmup))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Start the fakes, run each mode on its own proxy, print the tables."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    results: dict[str, Any] = {"settings": vars(args).copy(), "modes": {}}
    with ExitStack() as stack:
        fakes: list[Server] = []
        stack.callback(servers.remove_logs, fakes)  # last, once every fake has stopped
        for _ in range(args.backends):
            usage = args.scenario != "usageless"
            fakes.append(servers.start_fake(token_delay=args.token_delay, stream_usage=usage))
            stack.callback(servers.stop, fakes[-1])
        for mode in args.modes:
            results["modes"][mode] = run_mode(mode, fakes, args)
    ratios(results)
    results["targets"] = targets(results)
    report(results, args)
    broken = any(m["errors"] or not m["tokens_per_s"] for m in results["modes"].values())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
