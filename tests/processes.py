"""Real servers as subprocesses on loopback: started until they say they are ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gevent

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
START_LIMIT = 30  # seconds a server may take to say it is ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(
    command: list[str], ready: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Run `command` until the block ends; enter once its output shows `ready`.

    Reading its output line by line waits for readiness without polling or sleeping.
    """
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    drain = None
    try:
        with gevent.Timeout(START_LIMIT, AssertionError(f"{command[0]} never said {ready!r}")):
            for line in process.stdout:
                if ready in line:
                    break
            else:
                raise AssertionError(f"{command[0]} exited before it was ready")
        drain = gevent.spawn(process.stdout.read)  # a full pipe would stall the server
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if drain is not None:
            drain.join(timeout=5)
        process.stdout.close()


def ollamamq(port: int, fake_url: str, *args: str) -> list[str]:
    """The command line that serves the proxy on `port` in front of `fake_url`."""
    return [str(BIN / "ollamamq"), "-p", str(port), "-o", fake_url, "--log-file", "", *args]
