"""`ollamamq top`: frames rendered from canned JSON, fetched from a served API, and run in a pty."""

import contextlib
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import termios
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import pytest
from gevent.pywsgi import WSGIServer
from rich.console import Console

from ollamamq.top import (
    LOGIN_MESSAGE,
    TopState,
    fetch,
    handle_key,
    make_session,
    parse_keys,
    render,
)

PASSWORD = "s3cret"
OLLAMAMQ = Path(sys.executable).with_name("ollamamq")
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")

CANNED = {
    "overview": {
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "fairness": "round-robin",
        "totals": {"waiting": 1, "active": 1, "served": 120, "errors": 2},
        "backends": [
            {
                "name": "gpu-1",
                "url": "http://10.0.0.1:11434",
                "up": True,
                "latency_ms": 12.5,
                "active": 1,
                "slots": 2,
                "models": ["llama3:8b", "qwen2:7b"],
                "loaded": ["llama3:8b"],
                "error": None,
            },
            {
                "name": "gpu-2",
                "url": "http://10.0.0.2:11434",
                "up": False,
                "latency_ms": None,
                "active": 0,
                "slots": 1,
                "models": [],
                "loaded": [],
                "error": "connection refused",
            },
        ],
        "throughput": [
            {"minute": f"2025-01-01T10:{m:02d}:00Z", "requests": m % 7, "tokens": 10 * m}
            for m in range(60)
        ],
    },
    "users": {
        "users": [
            {
                "user": "alice",
                "waiting": 0,
                "active": 1,
                "served": 100,
                "errors": 1,
                "cancelled": 0,
                "tokens_in": 15300,
                "tokens_out": 2_400_000,
                "avg_wait_ms": 230.0,
                "p95_wait_ms": 1800.0,
                "last_seen": "2025-01-01T10:59:00Z",
                "blocked": False,
                "vip": True,
                "weight": 2,
                "service": 0.5,
            },
            {
                "user": "mallory",
                "waiting": 1,
                "active": 0,
                "served": 20,
                "errors": 1,
                "cancelled": 3,
                "tokens_in": 900,
                "tokens_out": 50,
                "avg_wait_ms": None,
                "p95_wait_ms": None,
                "last_seen": None,
                "blocked": True,
                "vip": False,
                "weight": 1,
                "service": 0.1,
            },
        ]
    },
    "queue": {
        "waiting": [
            {
                "id": 8,
                "user": "mallory",
                "model": "qwen2:7b",
                "path": "/api/chat",
                "seconds": 4.2,
                "position": 1,
            }
        ],
        "active": [
            {
                "id": 7,
                "user": "alice",
                "model": "llama3:8b",
                "path": "/api/generate",
                "backend": "gpu-1",
                "seconds": 65.0,
                "tokens": 321,
            }
        ],
    },
    "downloads": {
        "jobs": [
            {
                "id": 3,
                "model": "mistral:7b",
                "status": "downloading",
                "requested_by": "alice",
                "user": "alice",
                "created_at": "2025-01-01T09:00:00Z",
                "started_at": "2025-01-01T10:00:00Z",
                "finished_at": None,
                "completed_bytes": 42,
                "total_bytes": 100,
                "attempts": 2,
                "last_error": "stalled once",
                "percent": 42.0,
                "position": None,
            }
        ],
        "counts": {"downloading": 1},
        "next_run": "2025-01-02T02:00:00Z",
        "processing": True,
        "window_open": False,
    },
}


def canned_state(**changes) -> TopState:
    """A state as if the four answers above had just been fetched."""
    return TopState(url="http://proxy:11435", **CANNED, **changes)


def frame_text(state: TopState) -> str:
    """The frame as plain text, 140 columns wide."""
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(render(state))
    return console.export_text()


def admin_api(environ, start_response):
    """The canned admin API, behind the Bearer password."""
    name = environ["PATH_INFO"].removeprefix("/admin/api/")
    if environ.get("HTTP_AUTHORIZATION") != f"Bearer {PASSWORD}":
        status, body = "401 UNAUTHORIZED", {"error": "admin login required"}
    elif name in CANNED:
        status, body = "200 OK", CANNED[name]
    else:
        status, body = "404 NOT FOUND", {"error": "not found"}
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


@pytest.fixture
def api_url() -> Iterator[str]:
    """The canned admin API served on a free loopback port."""
    server = WSGIServer(("127.0.0.1", 0), admin_api, log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


def test_frame_shows_backends_users_requests_and_downloads():
    text = frame_text(canned_state())
    assert "ollamamq 0.1.0" in text and "1h 02m" in text and "round-robin" in text
    assert "● up" in text and "✗ down" in text and "connection refused" in text
    assert "12 ms" in text and "1/2" in text and "llama3:8b" in text
    assert "★ alice" in text and "mallory" in text and "blocked" in text
    assert "15.3k" in text and "2.4M" in text and "1.8 s" in text
    assert "1 active, 1 waiting" in text and "/api/generate" in text and "#1" in text
    assert "mistral:7b" in text and "downloading" in text and "42%" in text
    assert "stalled once" in text and "processing" in text
    assert "▁" in text and "peak 6" in text


def test_frame_before_any_answer_says_it_waits():
    text = frame_text(TopState(url="http://proxy:11435", error="cannot connect to x"))
    assert "waiting for the first answer" in text and "✗ cannot connect to x" in text


def test_help_panel_toggles_with_question_mark_and_h():
    state = canned_state()
    assert "select the next user" not in frame_text(state)
    state = handle_key(state, "?")
    assert "select the next user" in frame_text(state)
    assert not handle_key(state, "h").help


def test_selection_moves_with_j_k_and_arrows_within_the_users():
    state = canned_state()
    assert handle_key(state, "k").selected == 0
    state = handle_key(state, "j")
    assert state.selected == 1
    assert handle_key(state, "down").selected == 1  # two users: stays on the last
    assert handle_key(state, "up").selected == 0


def test_selected_row_is_drawn_reversed():
    console = Console(record=True, width=140, file=io.StringIO(), force_terminal=True)
    console.print(render(canned_state(selected=1)))
    reversed_lines = [
        line for line in console.export_text(styles=True).splitlines() if "\x1b[7m" in line
    ]
    assert any("mallory" in line for line in reversed_lines)
    assert not any("alice" in line for line in reversed_lines)


def test_arrow_keys_and_a_lone_esc_are_named():
    assert parse_keys("j\x1b[B\x1bOAk") == ["j", "down", "up", "k"]
    assert parse_keys("\x1b") == ["esc"]
    assert parse_keys("\x1b[C?") == ["\x1b[C", "?"]  # right arrow: ignored, not Esc


def test_q_and_esc_quit():
    assert handle_key(canned_state(), "q").quit
    assert handle_key(canned_state(), "esc").quit
    assert not handle_key(canned_state(), "x").quit


def test_fetch_builds_the_state_from_the_served_api(api_url):
    with make_session(PASSWORD) as session:
        state = fetch(session, api_url, TopState(selected=1))
    assert state.error is None and state.updated is not None
    assert state.users == CANNED["users"] and state.downloads == CANNED["downloads"]
    assert state.selected == 1
    assert "mallory" in frame_text(state)


def test_fetch_without_the_password_asks_for_login(api_url):
    with make_session("") as session:
        state = fetch(session, api_url, TopState())
    assert state.error == LOGIN_MESSAGE
    assert LOGIN_MESSAGE in frame_text(state)


def test_refused_connection_keeps_the_old_answers_and_shows_the_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed as the block ends
    with make_session(PASSWORD) as session:
        state = fetch(session, url, canned_state())
    assert state.error == f"cannot connect to {url}"
    assert state.users == CANNED["users"]
    assert f"✗ cannot connect to {url}" in frame_text(state)


@dataclass
class Pty:
    """`ollamamq top` on a pseudo-terminal; `seen` holds everything it wrote."""

    controller: int
    terminal: int
    process: subprocess.Popen
    seen: list[str] = field(default_factory=list)

    def text(self) -> str:
        """What it wrote, without ANSI codes."""
        return ANSI.sub("", "".join(self.seen))

    def read_until(self, needle: str) -> None:
        """Read until `needle` shows in the text."""
        with gevent.Timeout(15):
            while needle not in self.text():
                select.select([self.controller], [], [])
                self.read()

    def wait(self) -> int:
        """Keep reading, so the child never blocks on a full pty, until it exits."""
        with gevent.Timeout(5):
            while self.process.poll() is None:
                if select.select([self.controller], [], [], 0.05)[0]:
                    self.read()
        return self.process.returncode

    def read(self) -> None:
        """One chunk of output."""
        with contextlib.suppress(OSError):  # EIO once the child has closed its side
            self.seen.append(os.read(self.controller, 65536).decode(errors="replace"))

    def is_cooked(self) -> bool:
        """Whether the terminal is back in line mode with echo."""
        lflag = termios.tcgetattr(self.terminal)[3]
        return bool(lflag & termios.ICANON and lflag & termios.ECHO)


@pytest.fixture
def pty(api_url) -> Iterator[Pty]:
    """`ollamamq top` against the canned API, in a 140x50 pseudo-terminal."""
    controller, terminal = os.openpty()
    termios.tcsetwinsize(terminal, (50, 140))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"TERM": "xterm-256color", "OLLAMAMQ_ADMIN_PASSWORD": PASSWORD}
    command = [str(OLLAMAMQ), "top", "--url", api_url, "--interval", "0.2"]
    tty = dict(stdin=terminal, stdout=terminal, stderr=terminal)
    try:
        with subprocess.Popen(command, env=env, start_new_session=True, **tty) as process:
            try:
                yield Pty(controller, terminal, process)
            finally:
                if process.poll() is None:
                    process.kill()
    finally:
        os.close(controller)
        os.close(terminal)


def test_top_in_a_terminal_draws_and_quits_on_q(pty):
    pty.read_until("42%")
    assert not pty.is_cooked()  # cbreak while it runs
    os.write(pty.controller, b"q")
    assert pty.wait() == 0, pty.text()[-2000:]
    assert pty.is_cooked()
    assert "mallory" in pty.text() and "blocked" in pty.text() and "Traceback" not in pty.text()


def test_top_in_a_terminal_shows_help_and_quits_on_esc(pty):
    pty.read_until("42%")
    os.write(pty.controller, b"?")
    pty.read_until("select the next user")
    os.write(pty.controller, b"\x1b")
    assert pty.wait() == 0, pty.text()[-2000:]
    assert pty.is_cooked()


def test_top_in_a_terminal_restores_it_on_ctrl_c(pty):
    pty.read_until("42%")
    pty.process.send_signal(signal.SIGINT)
    assert pty.wait() == 0, pty.text()[-2000:]
    assert pty.is_cooked()
    assert "KeyboardInterrupt" not in pty.text() and "Traceback" not in pty.text()
