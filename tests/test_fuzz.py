"""No 500 on any input: the parsers take any bytes, the served proxy any malformed request."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.exceptions import HTTPException

from ollamamq.payloads import (
    FIELD_TYPES,
    ask_for_usage,
    estimate_input_tokens,
    loads,
    output_limit,
    parse_request,
)

PATHS = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
)
DIRECT = ("/api/show", "/api/pull", "/api/copy", "/api/create", "/api/push")
ODD_VALUES = (0, -1, 1.5, 10**400, True, "x", "", [], [1, "a"], {}, {"a": [1]}, None)
# Derandomized: the same examples on every run and machine; slow draws on a busy one are fine.
FIXED = settings(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def read_whole(path: str, payload: dict) -> None:
    """Everything the proxy does with a parsed body, which must not raise."""
    estimate_input_tokens(payload)
    output_limit(path, payload)
    ask_for_usage(path, payload, b"{}")


@settings(FIXED, max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_dict_or_a_400(body):
    try:
        payload = parse_request(body)
    except HTTPException as exc:
        assert exc.code == 400
    else:
        assert isinstance(payload, dict)
        read_whole("/v1/chat/completions", payload)


@settings(FIXED, max_examples=200)
@given(
    st.dictionaries(st.sampled_from(sorted(FIELD_TYPES)), json_values, max_size=6),
    st.sampled_from(PATHS),
)
def test_any_field_of_any_type_is_a_dict_or_a_400(fields, path):
    body = json.dumps({"model": "llama3", **fields}).encode()
    try:
        payload = parse_request(body)
    except HTTPException as exc:
        assert exc.code == 400
    else:
        read_whole(path, payload)


def test_deep_nesting_is_a_value_error_not_a_recursion_error():
    with pytest.raises(ValueError):
        loads(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(HTTPException):
        parse_request(b'{"model": "llama3", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")


def malformed_bodies(rng: random.Random) -> list[bytes]:
    """Bodies real networks and clients send: broken, deep, wrong types, bad encodings."""
    bodies = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"text"',
        b"1e999",
        b"NaN",
        b"[" * 200_000,
        b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model": "llama3", "messages": ' + b"{" * 5000 + b"}" * 5000 + b"}",
        b"\xff\xfe\xfd",
        b'{"model": "\xed\xa0\x80"}',  # a surrogate as raw UTF-8 bytes: invalid
        b'{"model": "\\ud800"}',  # a lone surrogate, escaped: valid JSON, an odd name
        b'{"model": "llama3", "prompt": "\\udfff\\ud800"}',
        b'{"model": "llama3\x00"}',
        '{"model": "llama3", "prompt": "caf\u00e9"}'.encode("latin-1"),
    ]
    for field in FIELD_TYPES:
        for value in ODD_VALUES:
            bodies.append(json.dumps({"model": "llama3", field: value}).encode())
    for _ in range(60):
        message = rng.choice(ODD_VALUES + ({"role": "user", "content": rng.choice(ODD_VALUES)},))
        bodies.append(json.dumps({"model": "llama3", "messages": [message]}).encode())
    return bodies


def test_a_fuzz_of_malformed_requests_gets_no_5xx_and_the_next_good_one_is_served(proxy, fake):
    rng = random.Random(20261202)
    bodies = malformed_bodies(rng)
    statuses: Counter[int] = Counter()
    sent = 0
    with requests.Session() as session:
        for body in bodies:
            for path in rng.sample(PATHS + DIRECT, 3):
                headers = {"Content-Type": "application/json", "X-User-ID": "fuzz"}
                answer = session.post(f"{proxy}{path}", data=body, headers=headers, timeout=10)
                sent += 1
                statuses[answer.status_code] += 1
                assert answer.status_code < 500, (path, body[:80], answer.text[:200])
                if answer.status_code >= 400:
                    error = answer.json()["error"]
                    assert isinstance(error, dict if path.startswith("/v1/") else str)
        chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
        good = session.post(f"{proxy}/api/chat", json={**chat, "stream": False}, timeout=10)
        assert good.status_code == 200 and good.json()["done"] is True
    print(f"fuzz: {sent} requests, statuses {dict(sorted(statuses.items()))}")
    assert sent >= 300


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": "pw"}])
def test_admin_and_queue_bodies_of_the_wrong_shape_are_400s(proxy):
    admin = {"Authorization": "Bearer pw"}
    settings_url = f"{proxy}/admin/api/users/ana/settings"
    refused = requests.post(settings_url, json=[1, 2], headers=admin, timeout=10)
    assert refused.status_code == 400 and "object" in refused.json()["error"]
    process = f"{proxy}/api/queue/process"
    for ids in (7, "12", [1, "x"]):
        answer = requests.post(process, json={"ids": ids}, headers=admin, timeout=10)
        assert answer.status_code == 400
