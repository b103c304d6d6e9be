"""Closed-loop load from wrk (if installed): the same small POST from every connection."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SCRIPT = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-User-ID"] = "bench"
"""
TIMEOUT = "10s"  # wrk's per-request timeout


def available() -> bool:
    """Whether a `wrk` binary is on PATH."""
    return shutil.which("wrk") is not None


def lua_string(body: bytes) -> str:
    """`body` as a Lua string literal."""
    return '"' + body.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'


def run(url: str, body: bytes, connections: int, seconds: float) -> dict[str, Any]:
    """Requests, req/s, failures and latency percentiles of one wrk run with one thread."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(SCRIPT.format(body=lua_string(body)))
        command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
        command += ["--timeout", TIMEOUT, "-s", str(script), url]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse(out) | percentiles(out)


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def percentiles(out: str) -> dict[str, float]:
    """p50_ms and p99_ms from wrk's --latency distribution."""
    found = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))\s*$", out, re.MULTILINE))
    result = {}
    for pct, value in found.items():
        number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
        result[f"p{pct}_ms"] = round(float(number) * UNITS_MS[unit], 3)
    return result


def parse(out: str) -> dict[str, Any]:
    """The figures of wrk's plain-text summary."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"requests": requests, "ok": requests - errors, "errors": errors, "rps": round(rps, 1)}
