"""From a Flask request to a relayed backend response: queued, or straight through."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Callable, Iterator
from functools import partial

import gevent
import requests
from flask import Response, current_app, request
from gevent.socket import wait_read

from .backends import Backend
from .dispatcher import Dispatcher, QueueFull, Ticket, UserBlocked
from .errors import json_error
from .fairshare import normalize_model
from .upstream import (
    READ_SIZE,
    STREAM_ERRORS,
    TAIL_BYTES,
    SizedStream,
    error_record,
    iter_body,
    open_stream,
    request_headers,
    response_headers,
    token_counts,
)

log = logging.getLogger(__name__)

SOCKET_KEYS = ("ollamamq.socket", "gunicorn.socket")  # where servers put the client socket
BYTES_PER_TOKEN = 4  # rough input estimate charged at dispatch, corrected on completion


def dispatcher() -> Dispatcher:
    """The app's dispatcher."""
    return current_app.extensions["ollamamq"]


def user_of() -> str:
    """X-User-ID, else a fingerprint of the API key, else the client address."""
    user = request.headers.get("X-User-ID", "").strip()
    if user:
        return user[: current_app.config["USER_ID_MAX_LENGTH"]]
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer ") and auth[7:].strip():
        return "key-" + hashlib.sha256(auth[7:].strip().encode()).hexdigest()[:12]
    return request.remote_addr or "unknown"


def timeouts() -> tuple[float, float]:
    """(connect, inactivity) timeouts for backend calls."""
    return current_app.config["CONNECT_TIMEOUT"], current_app.config["TIMEOUT"]


class ClientWatch:
    """Notices a client that hangs up while its request waits or streams."""

    def __init__(self, environ: dict, on_gone: Callable[[], None]) -> None:
        sock = next((environ[k] for k in SOCKET_KEYS if k in environ), None)
        self._greenlet = gevent.spawn(self._watch, sock, on_gone) if sock is not None else None
        if self._greenlet is not None:
            self._greenlet.name = "ollamamq-client-watch"

    @staticmethod
    def _watch(sock: socket.socket, on_gone: Callable[[], None]) -> None:
        try:
            wait_read(sock.fileno())
            hung_up = not sock.recv(1, socket.MSG_PEEK)
        except OSError:
            hung_up = True
        if hung_up:
            on_gone()

    def stop(self) -> None:
        """Stop watching (the response is over)."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)


def parse_request(body: bytes) -> tuple[dict | None, Response | None]:
    """The JSON object of a queued request, or the 400 that says what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        return None, json_error(400, f"invalid JSON body: {exc}")
    if not isinstance(payload, dict):
        return None, json_error(400, "the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        return None, json_error(400, "model is required")
    return payload, None


def serve_queued(path: str) -> Response:
    """Queue the request fairly, wait for a slot, then stream the backend's answer."""
    body = request.get_data(cache=False)  # over MAX_CONTENT_LENGTH raises 413 here
    payload, error = parse_request(body)
    if error is not None:
        return error
    model = normalize_model(payload["model"])
    queue = dispatcher()
    if not queue.pool.has_model(model):
        return json_error(404, f"model '{payload['model']}' not found, try pulling it first")
    try:
        ticket = queue.submit(user_of(), model, path, len(body) / BYTES_PER_TOKEN)
    except QueueFull as exc:
        return json_error(exc.status, str(exc), exc.retry_after)
    except UserBlocked as exc:
        return json_error(403, str(exc))
    watch = ClientWatch(request.environ, lambda: queue.abandon(ticket))
    if not ticket.wait():
        watch.stop()
        return json_error(410, "the request was cancelled while it was queued")
    response = _open(ticket.backend, path, body, ticket, queue)
    response.headers["X-Queue-Wait-Ms"] = f"{ticket.wait_ms:.1f}"
    response.call_on_close(watch.stop)
    response.call_on_close(lambda: queue.release(ticket))
    return response


def serve_direct(path: str, body: bytes | None = None) -> Response:
    """Relay a call that needs no slot (metadata, uploads, model management) both ways.

    The request body is streamed from the client unless the caller has already read it.
    """
    sent = body if body is not None else _streamed_body()
    return _open(dispatcher().pool.first_up(), path, sent, None, dispatcher())


def _streamed_body() -> SizedStream | Iterator[bytes] | None:
    """The client's body, read as it is sent; chunked bodies are forwarded chunked."""
    request.max_content_length = None  # blobs are gigabytes; they are streamed, not held
    if request.content_length is not None:
        return SizedStream(request.stream, request.content_length)
    if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return iter(partial(request.stream.read, READ_SIZE), b"")
    return None


def _open(backend: Backend, path: str, body, ticket: Ticket | None, queue: Dispatcher) -> Response:
    """Open the backend call; a failure before the first byte is a JSON error."""
    target = path + ("?" + request.query_string.decode() if request.query_string else "")
    headers = request_headers(request.headers.items())
    try:
        upstream = open_stream(backend, request.method, target, body, headers, timeouts())
    except requests.Timeout as exc:
        return _fail(ticket, queue, 504, f"backend {backend.name} did not answer in time: {exc}")
    except requests.RequestException as exc:
        backend.mark_down(str(exc))
        queue.wake()
        return _fail(ticket, queue, 502, f"backend {backend.name} is unreachable: {exc}")
    if ticket is not None:
        ticket.on_abandon = upstream.close
        ticket.failed = upstream.status_code >= 400
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    label = f"{request.method} {path} via {backend.name}"
    chunks = relay(upstream, ticket, is_sse, label)
    response = Response(chunks, upstream.status_code, response_headers(upstream.headers.items()))
    response.call_on_close(upstream.close)
    return response


def _fail(ticket: Ticket | None, queue: Dispatcher, status: int, message: str) -> Response:
    if ticket is not None:
        ticket.failed = True
        queue.release(ticket)
    return json_error(status, message)


def relay(
    upstream: requests.Response, ticket: Ticket | None, is_sse: bool, label: str
) -> Iterator[bytes]:
    """Yield the backend's chunks as they arrive, noting progress on the ticket."""
    tail = b""
    try:
        for chunk in iter_body(upstream):
            if ticket is not None:
                ticket.records += chunk.count(b"\n")
                tail = (tail + chunk)[-TAIL_BYTES:]
            yield chunk
    except STREAM_ERRORS as exc:
        message = f"backend stream failed: {exc}"
        log.warning("%s: %s", label, message)
        if ticket is not None:
            ticket.failed = True
        yield error_record(message, is_sse)
    if ticket is not None:
        ticket.tokens_in, ticket.tokens_out = token_counts(tail)
