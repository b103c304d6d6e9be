"""pywsgi's request handler, fitted to a proxy: a small reader, one write, a lean head."""

from __future__ import annotations

import socket
from typing import BinaryIO

from gevent.pywsgi import WSGIHandler, WSGIServer

READ_BUFFER = 1024  # bytes of each connection's request reader (pywsgi's default: 8 KB)
MAX_LINE = 65536  # as http.client's parse_headers
MAX_HEADERS = 100


class RequestHead:
    """A request's header fields as pywsgi reads them, without the email parser.

    pywsgi hands the header lines to http.client's parse_headers, which builds an email
    message: a hundred function calls per request. This reads the same lines with the same
    limits and answers the few questions pywsgi asks: get, getheader, typeheader, del, and
    the fields again as lines for the WSGI environ.
    """

    def __init__(self, rfile: BinaryIO) -> None:
        self.status = ""  # pywsgi answers 400 when it is set
        self.fields: list[tuple[str, str]] = []
        for _ in range(MAX_HEADERS + 1):
            line = rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                self.status = "Line too long"
                return
            if line in (b"\r\n", b"\n", b""):
                return
            self._add(line.decode("latin-1").rstrip("\r\n"))
        self.status = "Too many headers"

    def _add(self, line: str) -> None:
        if line[:1] in (" ", "\t") and self.fields:  # an obsolete folded continuation
            name, value = self.fields[-1]
            self.fields[-1] = (name, f"{value} {line.strip()}")
        elif ":" in line:
            name, value = line.split(":", 1)
            self.fields.append((name, value.strip()))

    @property
    def headers(self) -> list[str]:
        return [f"{name}: {value}\r\n" for name, value in self.fields]

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        return next((value for key, value in self.fields if key.lower() == name), default)

    getheader = get

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")

    def __delitem__(self, name: str) -> None:
        self.fields = [field for field in self.fields if field[0].lower() != name.lower()]


class Handler(WSGIHandler):
    """Hands the client socket to the app, which watches it for hang-ups."""

    def __init__(self, sock: socket.socket, address: tuple, server: WSGIServer) -> None:
        super().__init__(sock, address, server)
        # pywsgi's reader holds an 8 KB buffer per connection for as long as it is open,
        # a third of what a waiting client costs. Request lines and headers fit in 1 KB;
        # bodies are read straight past the buffer.
        self.rfile = sock.makefile("rb", READ_BUFFER)

    def handle(self) -> None:
        # A stream goes out one write per piece: without this, Nagle's algorithm holds a
        # piece for the client's delayed ACK (~40 ms).
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi sends the head, then the first piece of body: two system calls where one
        # does (send() was a sixth of the proxy's CPU at c=32). The same bytes otherwise.
        self.headers_sent = True
        self.finalize_headers()
        parts = [b"HTTP/1.1 ", self.status, b"\r\n"]
        for name, value in self.response_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if data:
            parts.append(b"%x\r\n%s\r\n" % (len(data), data) if self.response_use_chunked else data)
        self._sendall(b"".join(parts))

    def MessageClass(self, rfile: BinaryIO, _seekable: int) -> RequestHead:  # noqa: N802
        return RequestHead(rfile)

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["ollamamq.socket"] = self.socket
        environ["RAW_URI"] = self.path  # as sent, before decoding (gunicorn sets it too)
        return environ


class QuietHandler(Handler):
    """No pywsgi access line: the app logs each request itself (accesslog.py).

    pywsgi formats its line (a datetime and a %-format) even when its log is a no-op.
    """

    def log_request(self) -> None:
        pass
