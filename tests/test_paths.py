"""Nothing outside the API reaches a backend: traversal in any encoding is a 400 at the door."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pytest

DIGEST = "sha256:" + "a" * 64
TRAVERSALS = [
    ("GET", "/v1/models/../../../etc/passwd"),
    ("GET", "/v1/models/%2e%2e/%2e%2e/etc/passwd"),
    ("GET", "/v1/models/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd"),
    ("GET", "/v1/models/%252e%252e/%252e%252e/etc/passwd"),
    ("GET", "/v1/models/%25252e%25252e/etc"),
    ("GET", "/v1/models/..%5c..%5cetc%5cpasswd"),
    ("GET", "/v1/models/..\\..\\etc\\passwd"),
    ("GET", "/v1/models/llama3%00"),
    ("GET", "/v1/models/a%2Fb"),
    ("GET", "/api/tags/../../admin"),
    ("GET", "/./api/tags"),
    ("HEAD", "/api/blobs/..%5C..%5Cetc%5Cpasswd"),
    ("HEAD", "/api/blobs/%2e%2e"),
    ("POST", "/api/blobs/..%2f..%2fetc"),
    ("POST", "/api/chat/%2e%2e/%2e%2e/api/delete"),
]
BAD_NAMES = [
    ("HEAD", "/api/blobs/sha256:abc"),
    ("HEAD", "/api/blobs/md5:" + "a" * 32),
    ("HEAD", f"/api/blobs/{DIGEST.upper()}"),
    ("GET", "/v1/models/bad%20name"),
    ("GET", "/v1/models/a/b/c/d"),
    ("GET", "/v1/models/x:"),
]


def send(url: str, method: str, target: str) -> int:
    """One request with the target exactly as written (no client normalizes it)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        sock.sendall((head + "Connection: close\r\n\r\n").encode("latin-1"))
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


@pytest.mark.parametrize(("method", "target"), TRAVERSALS)
def test_a_path_with_dot_segments_in_any_encoding_is_refused(proxy, fake, method, target):
    seen = len(fake.received)
    assert send(proxy, method, target) == 400
    assert len(fake.received) == seen  # the backend never heard of it


@pytest.mark.parametrize(("method", "target"), BAD_NAMES)
def test_blob_digests_and_model_names_follow_ollamas_grammar(proxy, fake, method, target):
    seen = len(fake.received)
    assert send(proxy, method, target) == 400
    assert len(fake.received) == seen


def test_well_formed_names_still_reach_the_backend(proxy, fake):
    assert send(proxy, "GET", "/v1/models/llama3") == 200
    assert send(proxy, "GET", "/v1/models/qwen2:0.5b") == 200
    send(proxy, "HEAD", f"/api/blobs/{DIGEST}")
    paths = [r.path for r in fake.received]
    assert "/v1/models/llama3" in paths and f"/api/blobs/{DIGEST}" in paths


def test_only_documented_paths_are_forwarded(proxy, fake):
    seen = len(fake.received)
    for target in ("/api/unknown", "/v1/files", "/etc/passwd", "/api/tags/extra", "/v2/models"):
        assert send(proxy, "GET", target) in (404, 405)
    assert len(fake.received) == seen
