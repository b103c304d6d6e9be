"""The proxy's pywsgi handler: request heads read without the email parser, one write."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from gevent.pywsgi import WSGIServer

from ollamamq.wsgi_handler import Handler


def echo(environ: dict, start_response) -> list[bytes]:
    """The environ's headers and body, as JSON."""
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_") or k.startswith("CONTENT_")}
    seen["body"] = environ["wsgi.input"].read().decode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


@pytest.fixture
def address() -> Iterator[tuple[str, int]]:
    server = WSGIServer(("127.0.0.1", 0), echo, handler_class=Handler, log=None)
    server.start()
    yield "127.0.0.1", server.server_port
    server.stop()


def exchange(address: tuple[str, int], raw: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes; the status line and the body of the answer."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def test_headers_reach_the_environ_as_the_email_parser_gave_them(address) -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nHost: h\r\nX-User-ID:  ann \r\nX-Folded: one\r\n two\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    status, body = exchange(address, raw)
    seen = json.loads(body)
    assert status == b"HTTP/1.1 200 OK"
    assert seen["HTTP_X_USER_ID"] == "ann" and seen["HTTP_X_FOLDED"] == "one two"
    assert seen["CONTENT_TYPE"] == "application/json" and seen["CONTENT_LENGTH"] == "2"
    assert seen["body"] == "{}"


def test_a_chunked_body_wins_over_a_content_length(address) -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    status, body = exchange(address, raw)
    assert status == b"HTTP/1.1 200 OK" and json.loads(body)["body"] == "hi"


@pytest.mark.parametrize(
    "head",
    [b"X-Long: " + b"x" * 70_000 + b"\r\n", b"".join(b"X-%d: v\r\n" % i for i in range(101))],
    ids=["line too long", "too many headers"],
)
def test_an_oversized_head_is_a_400(address, head: bytes) -> None:
    status, _ = exchange(address, b"GET / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n")
    assert status.startswith(b"HTTP/1.1 400")
