"""The relay's HTTP/1.1 client against scripted servers: framing, reuse, failures."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gevent
import pytest
from gevent.event import Event
from gevent.server import StreamServer

from ollamamq.http1 import BrokenResponse, ConnectFailed, ConnectionPool, ReadTimeout

TIMEOUTS = (2.0, 2.0)
Script = Callable[[object, bytes], None]  # (socket, the request's bytes) -> writes an answer


def read_request(sock) -> bytes:
    """One request: its head, then a Content-Length body or a chunked one."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"<eof>"
        if data.endswith(b"<eof>"):
            return b""
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        None,
    )
    if length is not None:
        while len(rest) < length:
            rest += sock.recv(65536)
    elif b"transfer-encoding: chunked" in head.lower():
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


class Scripted:
    """A loopback server answering each request with the next script; it counts connections."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = list(scripts)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", 0), self._handle)

    def _handle(self, sock, _address) -> None:
        self.connections += 1
        try:
            while self.scripts:
                request = read_request(sock)
                if not request:
                    return
                self.requests.append(request)
                self.scripts.pop(0)(sock, request)
        except OSError:
            return  # a script closed the connection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Scripted, ConnectionPool]]]:
    """Start a scripted server; a pool to reach it, closed after the test."""
    started: list[tuple[Scripted, ConnectionPool]] = []

    def start(*scripts: Script) -> tuple[Scripted, ConnectionPool]:
        server = Scripted(*scripts)
        server.server.start()
        started.append((server, ConnectionPool(server.url)))
        return started[-1]

    yield start
    for server, pool in started:
        pool.close()
        server.server.stop()


def fetch(pool: ConnectionPool, method: str = "GET", body=None, timeouts=TIMEOUTS) -> bytes:
    """The whole answer; its connection goes back to the pool, or is closed."""
    response = pool.request(method, "/", body, {}, timeouts)
    try:
        return response.read()
    finally:
        response.close()


def answer(raw: bytes, close: bool = False) -> Script:
    def script(sock, _request) -> None:
        sock.sendall(raw)
        if close:
            sock.close()

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def test_a_sized_answer_is_read_and_its_connection_reused(serve) -> None:
    server, pool = serve(answer(OK), answer(OK))
    for _ in range(2):
        response = pool.request("POST", "/api/generate", b'{"a":1}', {"X-User-ID": "ann"}, TIMEOUTS)
        assert (response.status, response.header("content-type")) == (200, "application/json")
        assert response.read() == b"{}"
        response.close()
    assert server.connections == 1
    head = server.requests[0].decode()
    assert head.startswith("POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "X-User-ID: ann\r\n" in head and "Content-Length: 7\r\n" in head
    assert head.endswith('{"a":1}')


def test_a_chunked_stream_comes_piece_by_piece_as_the_backend_writes(serve) -> None:
    go_on = Event()

    def script(sock, _request) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        go_on.wait()
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")

    _, pool = serve(script)
    response = pool.request("GET", "/", None, {}, TIMEOUTS)
    pieces = response.stream()
    assert next(pieces) == b"hello"  # before the rest was even written
    go_on.set()
    assert b"".join(pieces) == b" world"
    response.close()
    assert len(pool._idle) == 1


def test_an_answer_delimited_by_close_ends_at_the_close(serve) -> None:
    _, pool = serve(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", close=True))
    assert fetch(pool) == b"all of it"
    assert pool._idle == []  # not reusable


def test_a_head_answer_has_no_body_whatever_its_length_says(serve) -> None:
    server, pool = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"), answer(OK))
    assert fetch(pool, "HEAD") == b""
    assert fetch(pool) == b"{}"
    assert server.connections == 1


def test_a_kept_connection_the_backend_closed_is_replaced_without_an_error(serve) -> None:
    server, pool = serve(answer(OK, close=True), answer(OK))
    assert fetch(pool) == b"{}"  # complete and keep-alive: kept, but the server closed it
    assert fetch(pool) == b"{}"
    assert server.connections == 2


def test_a_request_the_kept_connection_dropped_unanswered_is_sent_again(serve) -> None:
    server, pool = serve(answer(OK), lambda sock, request: sock.close(), answer(OK))
    assert fetch(pool, "POST", b"{}") == b"{}"
    assert fetch(pool, "POST", b"{}") == b"{}"
    assert server.connections == 2 and len(server.requests) == 3


def test_an_answer_broken_off_midway_is_a_broken_response(serve) -> None:
    _, pool = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly this", close=True))
    with pytest.raises(BrokenResponse, match="in the middle of the answer"):
        fetch(pool)


def test_a_server_that_is_not_http_is_a_broken_response(serve) -> None:
    _, pool = serve(answer(b"SSH-2.0-OpenSSH\r\n\r\n"))
    with pytest.raises(BrokenResponse, match="not valid HTTP"):
        fetch(pool)


def test_silence_past_the_timeout_is_a_read_timeout(serve) -> None:
    _, pool = serve(lambda sock, request: gevent.sleep(5))
    with pytest.raises(ReadTimeout):
        fetch(pool, timeouts=(2.0, 0.05))


def test_nobody_listening_is_a_connect_failure(serve) -> None:
    server, pool = serve()
    server.server.stop()
    with pytest.raises(ConnectFailed, match="cannot connect"):
        fetch(pool)


class Sized:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def read(self, size: int = -1) -> bytes:
        piece, self.data = self.data[:size], self.data[size:]
        return piece


def test_streamed_bodies_go_with_their_length_or_chunked(serve) -> None:
    server, pool = serve(answer(OK), answer(OK))
    fetch(pool, "POST", Sized(b"x" * 100_000))
    fetch(pool, "POST", iter([b"ab", b"", b"cd"]))
    sized, chunked = server.requests
    assert b"Content-Length: 100000\r\n" in sized and sized.endswith(b"x" * 100_000)
    assert b"Transfer-Encoding: chunked\r\n" in chunked
    assert chunked.endswith(b"\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")


def test_a_cut_wakes_the_reader_with_a_broken_stream(serve) -> None:
    def script(sock, _request) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        gevent.sleep(5)

    _, pool = serve(script)
    response = pool.request("GET", "/", None, {}, TIMEOUTS)
    pieces = response.stream()
    assert next(pieces) == b"a"
    gevent.spawn(response.cut)  # runs once the reader waits
    with pytest.raises(BrokenResponse):
        next(pieces)
    response.close()
    assert pool._idle == []
