"""The fake Ollama and the proxy as subprocesses on loopback, started and stopped for a run."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import gevent
import psutil

ROOT = Path(__file__).resolve().parent.parent  # `-m tests.fake_ollama` runs from here
START_TIMEOUT = 20.0  # seconds a server may take to import and bind
STOP_TIMEOUT = 10.0  # seconds a server may take to exit after SIGTERM (cProfile writes then)
PROBLEM_WORDS = ("WARNING", "ERROR", "CRITICAL", "Traceback")


@dataclass
class Server:
    """One server subprocess, its URL and the file its stderr goes to."""

    name: str
    url: str
    proc: subprocess.Popen | None = None  # None: started by someone else
    log_path: Path | None = None
    pid: int | None = None
    workdir: Path | None = None  # the proxy's working directory and database, removed at stop

    def problems(self) -> list[str]:
        """Warning, error and traceback lines the server logged so far."""
        if self.log_path is None or not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if any(word in line for word in PROBLEM_WORDS)]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_file(name: str) -> Path:
    """A fresh file in the temporary directory for a server's stderr."""
    handle = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    handle.close()
    return Path(handle.name)


def start_fake(
    tokens: int = 8, token_delay: float = 0.0, name: str = "fake", stream_usage: bool = True
) -> Server:
    """Start `python -m tests.fake_ollama` and read the URL it prints.

    `token_delay` comes before every token, the first one included.
    """
    log_path = log_file(name)
    args = ["--port", "0", "--tokens", str(tokens), "--token-delay", str(token_delay)]
    args += [] if stream_usage else ["--no-stream-usage"]
    command = [sys.executable, "-m", "tests.fake_ollama", *args]
    command += ["--first-token-delay", str(token_delay)]
    with log_path.open("wb") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    server = Server(name, "", proc, log_path, proc.pid)
    try:
        with gevent.Timeout(START_TIMEOUT, RuntimeError("the fake did not print its URL")):
            line = proc.stdout.readline().decode().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the fake printed {line!r}: see {log_path}")
    except BaseException:
        stop(server)
        raise
    server.url = line.removeprefix("listening on ")
    return server


def start_proxy(
    backend: str,
    parallel: int,
    extra: list[str],
    profile: str = "",
    name: str = "proxy",
    database: Path | None = None,
) -> Server:
    """Start `python -m ollamamq` on a free port, optionally under cProfile; wait until up.

    Its database is a fresh one in its working directory unless replicas share `database`.
    """
    port = free_port()
    log_path = log_file(name)
    runner = ["-m", "cProfile", "-o", str(Path(profile).resolve())] if profile else []
    command = [sys.executable, *runner, "-m", "ollamamq", "-p", str(port), "-H", "127.0.0.1"]
    command += ["-o", backend, "--no-tui", "--log-file", "", "--log-level", "WARNING"]
    command += ["--backend-parallel", str(parallel), *extra]
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    database = database or workdir / "ollamamq.db"  # never the repository's
    env = os.environ | {"DB_PATH": str(database), "DATABASE_URL": f"sqlite:///{database}"}
    with log_path.open("wb") as err:
        proc = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    return _up(Server(name, f"http://127.0.0.1:{port}", proc, log_path, proc.pid, workdir))


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{ server {backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(backend: str, name: str = "nginx") -> Server | None:
    """A single-process pass-through nginx in front of `backend`, or None if not installed."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        return None
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, backend=urlsplit(backend).netloc))
    log_path = log_file(name)
    command = [binary, "-p", str(workdir), "-c", str(conf), "-e", "stderr"]
    with log_path.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    return _up(Server(name, f"http://127.0.0.1:{port}", proc, log_path, proc.pid, workdir))


def _up(server: Server) -> Server:
    """The server once it answers; stopped if it never does."""
    try:
        wait_until_up(server)
    except BaseException:
        stop(server)
        raise
    return server


def wait_until_up(server: Server) -> None:
    """Poll GET /health until any HTTP answer comes; raise if the process dies or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    parts = urlsplit(server.url)
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}: see {server.log_path}"
            )
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            conn.getresponse().read()
            return  # serving HTTP; a /health that fails shows up in the server's log
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        gevent.sleep(0.05)
    raise RuntimeError(f"{server.name} did not answer on {server.url}: see {server.log_path}")


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL if the server is still there after STOP_TIMEOUT."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=STOP_TIMEOUT)
    if server.workdir is not None:
        shutil.rmtree(server.workdir, ignore_errors=True)


def pid_listening(url: str) -> int | None:
    """The pid of the local process listening on the URL's port, if it can be seen."""
    port = urlsplit(url).port
    try:
        conns = psutil.net_connections("tcp")
    except psutil.AccessDenied:
        return None
    pids = (c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port)
    return next(pids, None)


def external(name: str, url: str) -> Server:
    """A server someone else runs; its pid is looked up for memory and CPU figures."""
    url = url.rstrip("/")
    return Server(name, url, None, None, pid_listening(url))


def backend_of(proxy_url: str) -> str:
    """The first backend URL a running proxy reports on /health."""
    parts = urlsplit(proxy_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5.0)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())["backends"][0]["url"]
    finally:
        conn.close()


def remove_logs(started: Iterable[Server]) -> None:
    """Delete the servers' stderr files (read their problems first)."""
    for server in started:
        if server.log_path is not None:
            server.log_path.unlink(missing_ok=True)
