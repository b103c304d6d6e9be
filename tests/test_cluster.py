"""Several replicas as real processes, one fair queue through a real redis-server.

The invariants are read off the fake backends' own records: in-flight never above the
slots, every request generated exactly once, slots back after a replica dies.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator

import gevent
import pytest
import redis
import requests
from gevent.event import Event
from gevent.pool import Pool

from tests.conftest import WAIT_LIMIT
from tests.fake_ollama import FakeOllama
from tests.processes import free_port, ollamamq, running
from tests.real_servers import redis_server

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class Replica:
    def __init__(self, name: str, port: int, process) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.process = process

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=10).json()


@contextlib.contextmanager
def replicas(
    redis_url: str, fakes: list[FakeOllama], names: list[str], tmp_path, *args: str
) -> Iterator[list[Replica]]:
    """Replicas started one after another (the schema is made once), stopped at the end."""
    backends = [a for fake in fakes[1:] for a in ("-o", fake.url)]
    env = {"DB_PATH": str(tmp_path / "shared.db"), "OLLAMAMQ_ADMIN_PASSWORD": ""}
    with contextlib.ExitStack() as stack:
        started = []
        for name in names:
            port = free_port()
            command = ollamamq(port, fakes[0].url, *backends, "--redis-url", redis_url, *args)
            command += ["--replica-id", name, "--health-interval", "3600"]
            process = stack.enter_context(running(command, "listening on", env))
            started.append(Replica(name, port, process))
        yield started


def until(is_done, what: str, limit: float = WAIT_LIMIT) -> None:
    with gevent.Timeout(limit, AssertionError(f"gave up waiting for {what}")):
        while not is_done():
            gevent.sleep(0.02)


def chat(url: str, user: str, prompt: str, tokens: int | None = None) -> list[dict]:
    """One streamed chat read to its end; its records."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": prompt}]}
    if tokens is not None:
        body["options"] = {"num_predict": tokens}
    headers = {"X-User-ID": user}
    with requests.post(f"{url}/api/chat", json=body, headers=headers, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.iter_lines() if line]


def prompts_generated(fakes: list[FakeOllama]) -> list[str]:
    return [
        r.json["messages"][0]["content"]
        for fake in fakes
        for r in fake.received
        if r.path == "/api/chat"
    ]


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture
def two_fakes() -> Iterator[list[FakeOllama]]:
    with FakeOllama(tokens=4, token_delay=0.002) as a, FakeOllama(tokens=4, token_delay=0.002) as b:
        yield [a, b]


def test_a_storm_over_three_replicas_never_exceeds_any_backends_slots(
    redis_url, two_fakes, tmp_path
):
    names = ["a", "b", "c"]
    with replicas(redis_url, two_fakes, names, tmp_path, "--backend-parallel", "2") as group:
        until(lambda: group[0].health()["cluster"]["leader"], "a leader")
        pool = Pool(48)
        jobs = [
            pool.spawn(chat, group[n % 3].url, f"user-{n % 10}", f"storm {n}")
            for n in range(1000)
        ]
        pool.join(timeout=120, raise_error=True)
        answers = [job.get() for job in jobs]
        inflight = group[1].health()["cluster"]["inflight"]
    assert all(records[-1]["done"] is True for records in answers)
    assert [fake.max_active for fake in two_fakes] == [2, 2]  # full use, never more
    generated = prompts_generated(two_fakes)
    assert sorted(generated) == sorted(f"storm {n}" for n in range(1000))  # each once
    assert all(count == 0 for count in inflight.values())
