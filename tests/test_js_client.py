"""The official `ollama` JavaScript library (npm `ollama`, tests/package.json) through the proxy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from gevent.event import Event

from tests.conftest import WAIT_LIMIT
from tests.test_clients import TEXT

SCRIPT = Path(__file__).parent / "js" / "ollama_client.mjs"


def run(proxy: str, step: str):
    """One step of the script; `make test` installs node and the package (tests/package.json)."""
    done = subprocess.run(
        ["node", str(SCRIPT), proxy, step], capture_output=True, text=True, timeout=WAIT_LIMIT * 3
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_chat_generate_embed_list_and_a_404_through_the_js_library(proxy):
    seen = run(proxy, "calls")
    assert seen["chat"] == seen["streamed"] == seen["generated"] == TEXT
    assert seen["last_done"] is True and seen["eval_count"] == 8
    assert seen["embeddings"] == 2
    assert {"llama3:latest", "qwen2:0.5b"} <= set(seen["models"])
    assert seen["missing"]["name"] == "ResponseError" and seen["missing"]["status"] == 404
    assert "missing" in seen["missing"]["message"]


@pytest.mark.parametrize("config", [{"BACKEND_PARALLEL": 1}])
def test_a_stream_the_library_aborts_frees_the_slot_at_once(proxy, fake, calls):
    fake.stall = Event()  # the answer stops after its first token, as a long one would
    stopped = run(proxy, "stop")
    assert stopped == {"seen": ["tok0 "], "aborted": "AbortError"}
    calls.wait_for("release", 1)  # the proxy saw the hang-up and gave the one slot back
    fake.stall.set()
    fake.stall = None
    assert run(proxy, "chat") == TEXT
