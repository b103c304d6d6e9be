"""Real Redis and PostgreSQL servers from Debian's packages, on loopback, for one test session."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from tests.processes import free_port, running


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A throwaway redis-server (on `port`, to restart one); yields its redis:// URL."""
    port = port or free_port()
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
    with running(command, "Ready to accept connections"):
        yield f"redis://127.0.0.1:{port}"


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
    try:
        with running(_as_postgres(command), "ready to accept connections"):
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        shutil.rmtree(data, ignore_errors=True)
