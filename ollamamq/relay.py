"""From a Flask request to a relayed backend response: queued, or straight through."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from functools import partial

import gevent
from flask import Response, after_this_request, current_app, request
from werkzeug.exceptions import (
    BadGateway,
    GatewayTimeout,
    Gone,
    HTTPException,
    ServiceUnavailable,
)

from .backends import Backend
from .budgets import budgets
from .dispatcher import Dispatcher
from .fairshare import normalize_model
from .http1 import READ_SIZE, ReadTimeout, peek
from .http1 import Response as Upstream
from .identity import user_of
from .payloads import (
    ModelNotFound,
    ask_for_usage,
    estimate_input_tokens,
    output_limit,
    parse_request,
)
from .services import dispatcher
from .ticket import ACTIVE, Ticket
from .upstream import (
    STREAM_ERRORS,
    TAIL_BYTES,
    SizedStream,
    drop_usage_events,
    error_record,
    request_headers,
    response_headers,
    token_counts,
)

log = logging.getLogger(__name__)

SOCKET_KEYS = ("ollamamq.socket", "gunicorn.socket")  # where servers put the client socket
RETRIES = 30  # busy or dead backends a request may meet before the client hears of it
CONTENT_MARKERS = {  # NDJSON comes from Ollama (Go, compact); Python SSE servers put a space
    False: (b'"done":false', None),
    True: (b'"finish_reason":null', b'"finish_reason": null'),
}


def timeouts() -> tuple[float, float]:
    """(connect, inactivity) timeouts for backend calls."""
    return current_app.config["CONNECT_TIMEOUT"], current_app.config["TIMEOUT"]


class ClientWatch:
    """Notices a client that hangs up while its request waits or streams.

    An I/O watcher in the hub, not a greenlet: it costs a few microseconds per request.
    The callback runs in the hub, so `on_gone` must not block.
    """

    __slots__ = ("_sock", "_on_gone", "_watcher")  # one per waiting client: thousands

    def __init__(self, environ: dict, on_gone: Callable[[], None]) -> None:
        self._sock = next((environ[k] for k in SOCKET_KEYS if k in environ), None)
        self._on_gone = on_gone
        self._watcher = None
        if self._sock is not None and self._sock.fileno() >= 0:
            self._watcher = gevent.get_hub().loop.io(self._sock.fileno(), 1)  # 1: readable
            self._watcher.start(self._readable)

    def _readable(self) -> None:
        waiting = peek(self._sock)
        if waiting is None:
            return
        self.stop()  # data instead of a hang-up is the client's next request: stop looking
        if not waiting:
            self._on_gone()

    def stop(self) -> None:
        """Stop watching (the response is over)."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None


class Cancelled(Gone):
    description = "the request was cancelled while it was queued"


class NoBackendTook(ServiceUnavailable):
    description = "no backend could take the request"


class BackendUnreachable(BadGateway):
    pass


class BackendTimeout(GatewayTimeout):
    pass


class ClientGone(HTTPException):
    """The client hung up before its answer was sent (nginx's 499, for the access log)."""

    code = 499
    description = "the client closed the connection"


def serve_queued(path: str) -> Response:
    """Queue the request fairly, wait for a slot, then stream the backend's answer."""
    budgets().check(user_of())  # every inference call comes through here; listings do not
    body = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH raises 413 here
    payload = parse_request(body)
    model = normalize_model(payload["model"])
    queue = dispatcher()
    if not queue.pool.has_model(model):
        raise ModelNotFound(payload["model"])
    body, strip_usage = ask_for_usage(path, payload, body)
    limit = output_limit(path, payload)
    ticket = queue.submit(user_of(), model, path, estimate_input_tokens(payload), limit)
    request.environ["ollamamq.ticket"] = ticket  # for the access line and metrics at close
    watch = ClientWatch(request.environ, lambda: queue.abandon(ticket))
    after_this_request(partial(_closing, lambda: (watch.stop(), queue.release(ticket))))
    upstream = _dispatch(ticket, queue, path, body)
    response = _response(upstream, ticket, f"{path} via {ticket.backend.name}", strip_usage)
    response.headers["X-Queue-Wait-Ms"] = f"{ticket.wait_ms:.1f}"
    return response


def _closing(callback: Callable[[], None], response: Response) -> Response:
    """Whatever the answer (relayed, or an error raised on the way), clean up once it is sent."""
    response.call_on_close(callback)
    return response


def _dispatch(ticket: Ticket, queue: Dispatcher, path: str, body: bytes) -> Upstream:
    """Wait for a slot and open the backend call.

    A busy backend (503), or one that refuses the connection while another is healthy,
    sends the ticket back to the head of its user's queue: nothing was sent yet.
    """
    for _ in range(RETRIES):
        if not ticket.wait():
            raise Cancelled()
        backend = ticket.backend
        _interrupt_on_abandon(ticket)
        try:
            upstream = _connect(backend, path, body)
        except (BackendUnreachable, BackendTimeout):
            if backend.is_up or not any(b.is_up for b in queue.pool):
                ticket.failed = True
                queue.release(ticket)
                raise
            queue.requeue(ticket, rest_s=0)  # it was just marked down; others are healthy
            continue
        if upstream.status != 503:
            return upstream
        upstream.close()
        log.info("backend %s is busy; a request of %s waits again", backend.name, ticket.user)
        queue.requeue(ticket, current_app.config["BUSY_RETRY_S"])
    queue.abandon(ticket)
    raise NoBackendTook(retry_after=1)


def _interrupt_on_abandon(ticket: Ticket) -> None:
    """Until the backend begins its answer, a client that leaves interrupts the wait for it.

    Ollama sends a non-streamed answer's headers only once it is all generated: without
    this, a client gone during a long generation would hold its slot to the end. The
    interruption closes the backend connection, so the backend stops. It is thrown from the
    hub, as gevent.Timeout's is, and only while the ticket still waits for the answer.
    """
    waiting = gevent.getcurrent()

    def interrupt() -> None:
        if ticket.on_abandon is abandon and ticket.state == ACTIVE and not waiting.dead:
            waiting.throw(ClientGone())

    def abandon() -> None:
        gevent.get_hub().loop.run_callback(interrupt)

    ticket.on_abandon = abandon


def serve_direct(path: str, body: bytes | None = None, model: str | None = None) -> Response:
    """Relay a call that needs no slot (metadata, uploads, model management) both ways.

    It goes to a healthy backend that has `model`, if one is named. The request body is
    streamed from the client unless the caller has already read it.
    """
    sent = body if body is not None else _streamed_body()
    backend = dispatcher().pool.backend_for(model)
    upstream = _connect(backend, path, sent)
    return _response(upstream, None, f"{path} via {backend.name}")


def _streamed_body() -> SizedStream | Iterator[bytes] | None:
    """The client's body, read as it is sent; chunked bodies are forwarded chunked."""
    request.max_content_length = None  # blobs are gigabytes; they are streamed, not held
    if request.content_length is not None:
        return SizedStream(request.stream, request.content_length)
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return iter(partial(request.stream.read, READ_SIZE), b"")
    return None


def _connect(backend: Backend, path: str, body) -> Upstream:
    """Send the request; a failure before the first byte raises a 502 or 504."""
    target = path + ("?" + request.query_string.decode() if request.query_string else "")
    headers = request_headers(request.headers.items())
    try:
        return backend.pool.request(request.method, target, body, headers, timeouts())
    except ReadTimeout as exc:
        raise BackendTimeout(f"backend {backend.name} did not answer in time: {exc}") from None
    except STREAM_ERRORS as exc:
        backend.mark_down(str(exc))
        dispatcher().wake()
        raise BackendUnreachable(f"backend {backend.name} is unreachable: {exc}") from None


def _response(
    upstream: Upstream, ticket: Ticket | None, label: str, strip_usage: bool = False
) -> Response:
    """The backend's answer for the client: a JSON document whole, a stream as it comes."""
    content_type = upstream.header("Content-Type")
    if ticket is not None:
        ticket.on_abandon = upstream.cut
        ticket.failed = upstream.status >= 400
    if content_type.startswith("application/json"):
        return _whole(upstream, ticket, label)
    is_sse = content_type.startswith("text/event-stream")
    chunks = upstream.stream()
    if ticket is not None:
        chunks = observe(chunks, ticket, is_sse)
    if strip_usage:
        chunks = drop_usage_events(chunks)
    body = relay(chunks, ticket, is_sse, label)
    response = Response(body, upstream.status, response_headers(upstream.headers))
    response.call_on_close(upstream.close)
    return response


def _whole(upstream: Upstream, ticket: Ticket | None, label: str) -> Response:
    """A non-streamed answer, read before anything is sent: one write, with its length.

    Nothing has reached the client yet, so a backend that fails now is a clean 502 or 504.
    """
    try:
        data = upstream.read()
    except STREAM_ERRORS as exc:
        if ticket is not None and ticket.abandoned:
            log.info("%s: the client left before the answer; the backend call was cut", label)
            raise ClientGone() from None
        if ticket is not None:
            ticket.failed = True
        if isinstance(exc, ReadTimeout):
            raise BackendTimeout(f"{label}: the backend stopped answering: {exc}") from None
        raise BackendUnreachable(f"{label}: the backend's answer broke off: {exc}") from None
    finally:
        upstream.close()
    if ticket is not None:
        ticket.first_byte_at = time.monotonic()
        _settle(ticket, data[-TAIL_BYTES:])
    return Response(data, upstream.status, response_headers(upstream.headers))


def observe(chunks: Iterator[bytes], ticket: Ticket, is_sse: bool) -> Iterator[bytes]:
    """Count content records as they pass; read the backend's token counts from the end.

    A content record is an Ollama record not yet done, or an SSE chunk not yet finished:
    one token each. They are what a stream is charged when the backend never says. Only
    the last bytes are kept for the counts, in a buffer cut back every few kilobytes.
    """
    compact, spaced = CONTENT_MARKERS[is_sse]
    tail = bytearray()
    for chunk in chunks:
        ticket.first_byte_at = ticket.first_byte_at or time.monotonic()  # read once per chunk
        ticket.records += chunk.count(compact) + (spaced is not None and chunk.count(spaced))
        tail += chunk
        if len(tail) > 2 * TAIL_BYTES:
            del tail[:-TAIL_BYTES]
        yield chunk
    _settle(ticket, bytes(tail[-TAIL_BYTES:]))


def _settle(ticket: Ticket, tail: bytes) -> None:
    """Take the backend's own token counts from the end of its answer, when it gave them."""
    counts = token_counts(tail)
    if any(counts):
        ticket.tokens_in, ticket.tokens_out = counts
        ticket.reported = True


def relay(
    chunks: Iterator[bytes], ticket: Ticket | None, is_sse: bool, label: str
) -> Iterator[bytes]:
    """Yield chunks as they arrive; a broken stream ends with an error record."""
    try:
        yield from chunks
    except STREAM_ERRORS as exc:
        if ticket is not None and ticket.abandoned:
            log.info("%s: the client left mid-stream; the backend call was cut", label)
            return
        message = f"backend stream failed: {exc}"
        log.warning("%s: %s", label, message)
        if ticket is not None:
            ticket.failed = True
        yield error_record(message, is_sse)
