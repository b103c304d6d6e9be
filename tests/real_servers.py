"""Real Redis and PostgreSQL servers from Debian's packages, on loopback, for one test session."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import gevent

START_LIMIT = 30  # seconds a server may take to say it is ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_line(process: subprocess.Popen, ready: str, name: str) -> None:
    """Read the server's output until it says `ready` (no polling, no sleeping)."""
    with gevent.Timeout(START_LIMIT, AssertionError(f"{name} did not start")):
        for line in process.stdout:
            if ready in line:
                return
    raise AssertionError(f"{name} exited before it was ready")


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server; yields its redis:// URL."""
    port = free_port()
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "Ready to accept connections", "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return found[-1]


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields a SQLAlchemy URL to its `postgres` database."""
    data = tempfile.mkdtemp(prefix="ollamamq-pg-")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    initdb = [_pg_bin("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run(_as_postgres(initdb), check=True, capture_output=True, timeout=120)
    port = free_port()
    command = [
        _pg_bin("postgres"),
        "-D",
        data,
        "-p",
        str(port),
        "-h",
        "127.0.0.1",
        "-k",
        data,
        "-c",
        "fsync=off",
    ]
    process = subprocess.Popen(
        _as_postgres(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for_line(process, "ready to accept connections", "postgres")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
        shutil.rmtree(data, ignore_errors=True)
