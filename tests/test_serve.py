"""The proxy really starts both ways: the `ollamamq` command and gunicorn's gevent worker."""

from __future__ import annotations

import json
import subprocess

import requests

from tests.processes import BIN, free_port, running


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
