"""The proxy really starts both ways: the `ollamamq` command and gunicorn's gevent worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gevent
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], ready: str, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run `command` until the test ends; return once stderr shows `ready`."""
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True
    )
    try:
        with gevent.Timeout(20, AssertionError(f"{command[0]} never said {ready!r}")):
            for line in process.stderr:
                if ready in line:
                    break
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        process.stderr.close()


def ollamamq(port: int, fake_url: str, *args: str) -> list[str]:
    """The command line that serves the proxy on `port` in front of `fake_url`."""
    return [str(BIN / "ollamamq"), "-p", str(port), "-o", fake_url, "--log-file", "", *args]


def stream_chat(url: str) -> list[dict]:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(f"{url}/api/chat", json=body, stream=True, timeout=10) as response:
        assert response.status_code == 200
        assert float(response.headers["X-Queue-Wait-Ms"]) >= 0
        return [json.loads(line) for line in response.iter_lines()]


def test_ollamamq_command_serves_a_stream(fake, tmp_path):
    port = free_port()
    command = [
        str(BIN / "ollamamq"),
        "-p",
        str(port),
        "-o",
        fake.url,
        "--no-tui",
        "--log-file",
        str(tmp_path / "ollamamq.log"),
    ]
    with running(command, "listening on", {"DB_PATH": str(tmp_path / "q.db")}):
        records = stream_chat(f"http://127.0.0.1:{port}")
    assert records[-1]["done"] is True and len(records) == 9
    assert "listening on" in (tmp_path / "ollamamq.log").read_text()


def test_gunicorn_gevent_worker_serves_a_stream(fake, tmp_path):
    port = free_port()
    command = [
        str(BIN / "gunicorn"),
        "-k",
        "gevent",
        "-w",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "wsgi:app",
    ]
    env = {"OLLAMA_URL": fake.url, "LOG_FILE": "", "DB_PATH": str(tmp_path / "q.db")}
    with running(command, "Listening at", env):  # the socket is bound: requests wait for the worker
        records = stream_chat(f"http://127.0.0.1:{port}")
    assert records[-1]["done"] is True and len(records) == 9


def test_version_and_help():
    for flag in ("--version", "--help"):
        result = subprocess.run([str(BIN / "ollamamq"), flag], capture_output=True, text=True)
        assert result.returncode == 0 and "ollamamq" in result.stdout
