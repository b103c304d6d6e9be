"""The shipped deployments: Dockerfile, compose file and systemd unit, linted and run as-is.

Docker cannot build images here (no registry for base images), so the image's and the
unit's start commands run on this machine with the environment they declare, against the
fake backend; only the address is held to loopback and the paths to a temporary directory.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import requests

from tests.processes import BIN, ROOT, free_port, running

DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "ollamamq.service"
INSTALLED_AT = "/opt/ollamamq"  # where the unit expects the checkout (README "systemd")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def docker_env(dockerfile: Path) -> dict[str, str]:
    pairs = [arg for name, arg in instructions(dockerfile) if name == "ENV"]
    return dict(word.split("=", 1) for arg in pairs for word in shlex.split(arg))


def docker_exec(dockerfile: Path, name: str) -> list[str]:
    """The exec-form command of CMD or HEALTHCHECK, as the image runs it."""
    (arg,) = [arg for kind, arg in instructions(dockerfile) if kind == name]
    return json.loads(arg[arg.index("CMD") + 3 :] if name == "HEALTHCHECK" else arg)


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def on_loopback(env: dict[str, str], fake_url: str, tmp_path: Path) -> dict[str, str]:
    """The declared environment with only what this machine needs changed."""
    return {
        **env,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "DB_PATH": str(tmp_path / "ollamamq.db"),
        "OLLAMA_URL": fake_url,
        "HEALTH_INTERVAL": "3600",
    }


def serves_and_stops(command: list[str], env: dict[str, str], check: list[str] = ()) -> None:
    """Start `command`, get an answer through it, run the health check, then SIGTERM: exit 0."""
    path = {"PATH": f"{BIN}:{os.environ['PATH']}"}  # the venv is the image's /usr/local
    with running(command, "listening on", {**env, **path}) as server:
        url = f"http://127.0.0.1:{env['PORT']}"
        chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        answer = requests.post(f"{url}/api/chat", json={**chat, "stream": False}, timeout=10)
        assert answer.status_code == 200 and answer.json()["done"] is True
        if check:
            healthy = subprocess.run(check, env={**os.environ, **env, **path}, timeout=10)
            assert healthy.returncode == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_the_dockerfile_passes_hadolint():
    linted = subprocess.run([BIN / "hadolint", DOCKERFILE], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_compose_file_follows_the_compose_spec():
    checked = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "ollama/ollama" in compose and "ollamamq.env" in compose


def test_the_image_runs_its_command_as_declared(fake, tmp_path):
    env = docker_env(DOCKERFILE)
    assert (
        env["HOST"] == "0.0.0.0"
        and env["PORT"] == "11435"
        and env["DB_PATH"] == "/data/ollamamq.db"
    )
    command = docker_exec(DOCKERFILE, "CMD")
    serves_and_stops(
        command, on_loopback(env, fake.url, tmp_path), docker_exec(DOCKERFILE, "HEALTHCHECK")
    )


def test_the_systemd_unit_verifies_and_its_command_runs(fake, tmp_path):
    settings = unit_settings(UNIT)
    for hardening in ("DynamicUser", "NoNewPrivileges", "ProtectSystem", "StateDirectory"):
        assert hardening in settings
    here = tmp_path / "ollamamq.service"  # the unit as installed in this checkout, not /opt
    here.write_text(UNIT.read_text().replace(INSTALLED_AT, str(ROOT)))
    verified = subprocess.run(
        [shutil.which("systemd-analyze"), "verify", here], capture_output=True, text=True
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    (exec_start,) = settings["ExecStart"]
    command = shlex.split(exec_start.replace(INSTALLED_AT, str(ROOT)))
    env = dict(w.split("=", 1) for line in settings["Environment"] for w in shlex.split(line))
    serves_and_stops(command, on_loopback(env, fake.url, tmp_path))
