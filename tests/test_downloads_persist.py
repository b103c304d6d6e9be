"""The download queue lives in the database: it survives a crash, and its schema is managed."""

from __future__ import annotations

import os
import signal
import subprocess

import requests
from gevent.event import Event

from tests.processes import BIN, ROOT, free_port, ollamamq, running


def queue_of(url: str) -> dict:
    return requests.get(f"{url}/api/queue", timeout=10).json()


def test_queue_survives_a_crash_mid_download(fake, tmp_path):
    env = {"DB_PATH": str(tmp_path / "queue.db")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fake.pull_gate = Event()  # the first download stalls after its first progress record
    with running(ollamamq(port, fake.url), "listening on", env) as server:
        for model in ("mistral", "phi3"):
            requests.post(f"{url}/api/pull", json={"model": model, "stream": False}, timeout=10)
        requests.post(f"{url}/api/queue/process", json={}, timeout=10)
        assert [j["model"] for j in queue_of(url)["downloading"]] == ["mistral:latest"]
        server.send_signal(signal.SIGKILL)  # a crash: no clean shutdown
    fake.pull_gate.set()
    with running(ollamamq(port, fake.url), "listening on", env):
        queue = queue_of(url)
        assert [(j["model"], j["status"]) for j in queue["queue"]] == [
            ("mistral:latest", "pending"),
            ("phi3:latest", "pending"),
        ]
        assert queue["downloading"] == []


def test_downloads_command_lists_processes_and_removes(fake, tmp_path):
    env = {
        **os.environ,
        "DB_PATH": str(tmp_path / "queue.db"),
        "OLLAMA_URL": fake.url,
        "LOG_FILE": "",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(ollamamq(port, fake.url), "listening on", env):
        for model in ("mistral", "phi3", "gemma"):
            requests.post(f"{url}/api/pull", json={"model": model, "stream": False}, timeout=10)

    def downloads(*args: str) -> subprocess.CompletedProcess:
        command = [str(BIN / "ollamamq"), "downloads", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    listed = downloads("list")
    assert listed.returncode == 0 and listed.stdout.count("pending") == 3
    assert downloads("remove", "gemma").returncode == 0
    assert downloads("remove", "gemma").returncode == 1
    processed = downloads("process")
    assert processed.returncode == 0 and processed.stdout.count("completed") == 2
    assert "mistral:latest" in fake.models and "gemma:latest" not in fake.models


def test_migrations_build_an_empty_database_without_drift(tmp_path):
    env = {**os.environ, "DB_PATH": str(tmp_path / "fresh.db"), "LOG_FILE": ""}
    flask = [str(BIN / "flask"), "--app", "ollamamq.app:create_app", "db"]
    upgrade = subprocess.run(
        [*flask, "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert upgrade.returncode == 0, upgrade.stderr
    check = subprocess.run(
        [*flask, "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr
