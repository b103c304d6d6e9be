"""`ollamamq top`: a live terminal dashboard over the proxy's admin JSON API."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import IO, Any

import gevent
import requests
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

ENDPOINTS = ("overview", "users", "queue", "downloads")
TIMEOUT = 2  # seconds per GET: a slow proxy must not freeze the keys for long
ACTION_TIMEOUT = 600  # a load waits for a free slot and for the model to reach memory
LOGIN_MESSAGE = "admin login required: pass --password or set OLLAMAMQ_ADMIN_PASSWORD"
SPARKS = "▁▂▃▄▅▆▇█"
# Arrow keys arrive as escape sequences; a lone ESC is the Esc key.
KEY_PATTERN = re.compile(r"\x1b[\[O][0-9;]*[A-Za-z~]|.", re.DOTALL)
KEY_NAMES = {"\x1b[A": "up", "\x1b[B": "down", "\x1bOA": "up", "\x1bOB": "down", "\x1b": "esc"}
HELP = (
    ("j / ↓", "select the next user"),
    ("k / ↑", "select the previous user"),
    ("m", "select the next model (backend / model)"),
    ("l / u", "load the selected model into memory / unload it"),
    ("? / h", "show or hide this help"),
    ("q / Esc", "quit"),
)

Json = dict[str, Any]
KeyReader = Callable[[float], list[str]]


class LoginRequired(Exception):
    """The proxy answered 401 or 403."""


@dataclass(frozen=True)
class TopState:
    """What one frame shows: the last answers, the selection, the help flag and the last error."""

    url: str = ""
    overview: Json = field(default_factory=dict)
    users: Json = field(default_factory=dict)
    queue: Json = field(default_factory=dict)
    downloads: Json = field(default_factory=dict)
    selected: int = 0
    help: bool = False
    error: str | None = None
    updated: datetime | None = None
    quit: bool = False
    model: int = 0  # index into models(): the selection for l and u
    action: tuple[str, str, str] | None = None  # (backend, model, "load"/"unload") to send
    notice: str | None = None  # how the last load or unload went


# Fetching


def make_session(password: str) -> requests.Session:
    """A session that sends the admin password as a Bearer token, if there is one."""
    session = requests.Session()
    if password:
        session.headers["Authorization"] = f"Bearer {password}"
    return session


def get_json(session: requests.Session, url: str) -> Json:
    """One admin API answer; 401/403 raise LoginRequired."""
    response = session.get(url, timeout=TIMEOUT)
    if response.status_code in (401, 403):
        raise LoginRequired
    response.raise_for_status()
    return response.json()


def describe(error: Exception, url: str) -> str:
    """A one-line reason for the status bar."""
    if isinstance(error, LoginRequired):
        return LOGIN_MESSAGE
    if isinstance(error, requests.ConnectionError):
        return f"cannot connect to {url}"
    if isinstance(error, requests.Timeout):
        return f"no answer from {url} within {TIMEOUT} s"
    if isinstance(error, requests.HTTPError):
        return f"{url} answered {error.response.status_code}"
    return f"bad answer from {url}: {error}"


def fetch(session: requests.Session, url: str, state: TopState) -> TopState:
    """The state with fresh answers, or with the old ones and an error to retry next tick."""
    try:
        answers = {name: get_json(session, f"{url}/admin/api/{name}") for name in ENDPOINTS}
    except (LoginRequired, requests.RequestException, ValueError) as error:
        return replace(state, url=url, error=describe(error, url))
    return replace(state, url=url, error=None, updated=datetime.now(), **answers)


def send_action(session: requests.Session, url: str, state: TopState) -> TopState:
    """Post the pending load or unload (it waits for a slot); the outcome becomes the notice."""
    backend, model, action = state.action  # type: ignore[misc]
    target = f"{url}/admin/api/backends/{backend}/models/{model}/{action}"
    try:
        response = session.post(target, json={}, timeout=ACTION_TIMEOUT)
        answer = response.json()
        notice = answer.get("message") or answer.get("error") or response.reason
    except (requests.RequestException, ValueError) as error:
        notice = describe(error, url)
    return replace(state, action=None, notice=f"{action} {model} on {backend}: {notice}")


# Keys


def parse_keys(data: str) -> list[str]:
    """Key names in what the terminal sent: characters, "up", "down", "esc"."""
    return [KEY_NAMES.get(key, key) for key in KEY_PATTERN.findall(data)]


def models(overview: Json) -> list[tuple[str, str]]:
    """Every (backend, model) installed, in the order the overview lists them."""
    return [
        (b.get("name", ""), m) for b in overview.get("backends", []) for m in b.get("models") or []
    ]


def selected_model(state: TopState) -> tuple[str, str] | None:
    """The (backend, model) that l and u act on."""
    choices = models(state.overview)
    return choices[state.model % len(choices)] if choices else None


def handle_key(state: TopState, key: str) -> TopState:
    """The state after one key press."""
    last = max(len(state.users.get("users", [])) - 1, 0)
    if key == "m":
        return replace(state, model=state.model + 1)
    if key in ("l", "u") and selected_model(state):
        backend, model = selected_model(state)  # type: ignore[misc]
        return replace(state, action=(backend, model, "load" if key == "l" else "unload"))
    if key in ("q", "esc"):
        return replace(state, quit=True)
    if key in ("?", "h"):
        return replace(state, help=not state.help)
    if key in ("j", "down"):
        return replace(state, selected=min(state.selected + 1, last))
    if key in ("k", "up"):
        return replace(state, selected=max(min(state.selected, last) - 1, 0))
    return state


def read_keys(fd: int, timeout: float) -> list[str]:
    """Keys pressed within `timeout` seconds; select() returns at the first one."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return []
    data = os.read(fd, 64)
    return parse_keys(data.decode(errors="replace")) if data else ["q"]  # b"": terminal gone


def idle(timeout: float) -> list[str]:
    """No keyboard: just wait for the next tick."""
    time.sleep(timeout)
    return []


@contextlib.contextmanager
def keyboard(stream: IO[str]) -> Iterator[KeyReader]:
    """Yield a key reader; a tty is put in cbreak mode and restored on exit, even on errors."""
    if not stream.isatty():
        yield idle
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)  # cbreak, not raw: Ctrl-C still interrupts and newlines still render
    try:
        yield partial(read_keys, fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# Formatting


def duration(seconds: float | None) -> str:
    """3d 4h, 1h 02m, 5m 03s or 12s."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def millis(ms: float | None) -> str:
    """Milliseconds, as seconds past one."""
    if ms is None:
        return "—"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def count(n: int | None) -> str:
    """12, 12.3k, 4.5M."""
    n = n or 0
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def clock(iso: str | None) -> str:
    """An ISO 8601 instant in local time."""
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled to the peak."""
    peak = max(values, default=0)
    return "".join(SPARKS[round(v / peak * (len(SPARKS) - 1)) if peak else 0] for v in values)


# Rendering


def new_table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A full-width table titled on its left; numbers in `right` columns line up."""
    table = Table(title=title, title_justify="left", expand=True)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def status_bar(state: TopState) -> Text:
    """The top line: where we look, when we last heard, or what went wrong."""
    bar = Text(f"ollamamq top · {state.url}", style="bold")
    if state.error:
        bar.append(f"  ✗ {state.error} (retrying)", style="bold red")
    elif state.updated:
        bar.append(f"  updated {state.updated:%H:%M:%S}", style="dim")
    if state.notice:
        bar.append(f"  {state.notice}", style="yellow")
    chosen = selected_model(state)
    if chosen:
        bar.append(f"  model {chosen[1]} @ {chosen[0]} (m next · l load · u unload)", style="dim")
    bar.append("  ? help · q quit", style="dim")
    return bar


def help_panel() -> Panel:
    """The keys."""
    table = Table.grid(padding=(0, 2))
    for keys, action in HELP:
        table.add_row(Text(keys, style="bold cyan"), action)
    return Panel(table, title="help", border_style="cyan", expand=False)


def backends_table(backends: list[Json]) -> Table:
    """One row per backend: health, latency, slots, loaded models."""
    table = Table(box=None, pad_edge=False, header_style="dim")
    for column in ("backend", "url", "state", "latency", "slots", "loaded", ""):
        table.add_column(column)
    for b in backends:
        state = Text("● up", "green") if b.get("up") else Text("✗ down", "bold red")
        table.add_row(
            b.get("name", ""),
            b.get("url", ""),
            state,
            millis(b.get("latency_ms")),
            f"{b.get('active', 0)}/{b.get('slots', 0)}",
            loaded_models(b),
            Text(b.get("error") or "", "red"),
        )
    return table


def loaded_models(backend: Json) -> str:
    """Loaded models with the memory each holds, from the backend's /api/ps."""
    running = backend.get("running") or []
    if not running:
        return ", ".join(backend.get("loaded") or []) or "—"
    return ", ".join(f"{r['model']} ({r.get('size_vram', 0) / 1e9:.1f} GB)" for r in running)


def overview_panel(overview: Json) -> Panel:
    """Version, uptime, totals, backends and the last hour's requests per minute."""
    if not overview:
        return Panel("waiting for the first answer…", title="ollamamq")
    totals = overview.get("totals", {})
    summary = Text(f"up {duration(overview.get('uptime_s'))} · fairness {overview.get('fairness')}")
    for name in ("waiting", "active", "served", "errors"):
        summary.append(f" · {name} ")
        summary.append(str(totals.get(name, 0)), "bold red" if name == "errors" else "bold")
    per_minute = [point.get("requests", 0) for point in overview.get("throughput", [])]
    spark = Text("req/min, last hour ")
    spark.append(sparkline(per_minute), "cyan")
    spark.append(f" peak {max(per_minute, default=0)}", "dim")
    body = Group(summary, backends_table(overview.get("backends", [])), spark)
    return Panel(body, title=f"ollamamq {overview.get('version', '')}", title_align="left")


def users_table(state: TopState) -> Table:
    """One row per user; the selected one is highlighted."""
    numbers = ("waiting", "active", "served", "tokens in", "tokens out", "avg wait", "p95 wait")
    table = new_table("users", ("user", *numbers, ""), right=numbers)
    users = state.users.get("users", [])
    selected = min(state.selected, len(users) - 1)
    for i, u in enumerate(users):
        table.add_row(
            ("★ " if u.get("vip") else "") + u.get("user", ""),
            *(str(u.get(k, 0)) for k in ("waiting", "active", "served")),
            count(u.get("tokens_in")),
            count(u.get("tokens_out")),
            millis(u.get("avg_wait_ms")),
            millis(u.get("p95_wait_ms")),
            Text("blocked", "bold red") if u.get("blocked") else "",
            style="reverse" if i == selected else None,
        )
    return table


def who(request: Json) -> tuple[str, str, str]:
    """User, model and path of a queued request."""
    return request.get("user", ""), request.get("model", ""), request.get("path", "")


def requests_table(queue: Json) -> Table:
    """Requests on a backend, then those waiting, oldest first."""
    active, waiting = queue.get("active", []), queue.get("waiting", [])
    title = f"requests: {len(active)} active, {len(waiting)} waiting"
    columns = ("", "user", "model", "path", "where", "time", "tokens")
    table = new_table(title, columns, right=("time", "tokens"))
    for r in active:
        where, tokens = r.get("backend", ""), count(r.get("tokens"))
        table.add_row(Text("▶ active", "green"), *who(r), where, duration(r.get("seconds")), tokens)
    for r in waiting:
        where = f"#{r.get('position')}"
        table.add_row(Text("… waiting", "yellow"), *who(r), where, duration(r.get("seconds")), "")
    return table


def downloads_table(downloads: Json) -> Table:
    """The download queue, with the next off-peak run in the title."""
    window = "open" if downloads.get("window_open") else "closed"
    busy = " · processing" if downloads.get("processing") else ""
    title = f"downloads: next run {clock(downloads.get('next_run'))} · window {window}{busy}"
    columns = ("model", "status", "progress", "%", "attempts", "last error")
    table = new_table(title, columns, right=("%", "attempts"))
    for job in downloads.get("jobs", []):
        percent = float(job.get("percent") or 0)
        table.add_row(
            job.get("model", ""),
            job.get("status", ""),
            ProgressBar(total=100, completed=percent, width=20),
            f"{percent:.0f}%",
            str(job.get("attempts", 0)),
            Text(job.get("last_error") or "", "red"),
        )
    return table


def render(state: TopState) -> RenderableType:
    """One frame: status, help if asked, overview, users, requests, downloads."""
    parts: list[RenderableType] = [status_bar(state)]
    if state.help:
        parts.append(help_panel())
    parts += [
        overview_panel(state.overview),
        users_table(state),
        requests_table(state.queue),
        downloads_table(state.downloads),
    ]
    return Group(*parts)


def run(url: str, password: str, interval: float) -> None:
    """Fetch every `interval` seconds and redraw after each tick or key, until quit."""
    state, due = TopState(url=url), 0.0
    live = Live(render(state), console=Console(), screen=True, auto_refresh=False)
    with make_session(password) as session, keyboard(sys.stdin) as wait_for_keys, live:
        while not state.quit:
            if time.monotonic() >= due:
                state = fetch(session, url, state)
                due = time.monotonic() + interval
            live.update(render(state), refresh=True)
            for key in wait_for_keys(max(due - time.monotonic(), 0)):
                state = handle_key(state, key)
            if state.action is not None:
                state = send_action(session, url, state)
                due = 0.0  # show what is loaded now


def main(url: str, password: str | None, interval: float) -> int:
    """`ollamamq top`: run until q, Esc or Ctrl-C."""
    password = password or os.environ.get("OLLAMAMQ_ADMIN_PASSWORD", "")
    # Ctrl-C lands in gevent's hub, which would print it; raise it here so every `with` unwinds.
    sigint = gevent.signal_handler(
        signal.SIGINT, gevent.kill, gevent.getcurrent(), KeyboardInterrupt
    )
    try:
        run(url.rstrip("/"), password, interval)
    except KeyboardInterrupt:
        pass
    finally:
        sigint.cancel()
    return 0
