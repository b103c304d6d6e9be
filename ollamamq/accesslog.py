"""One "request finished" record per proxied request: the access line and the metrics read it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from flask import Flask, Response, request

log = logging.getLogger("ollamamq.access")

PROXIED = ("proxy", "openai_api", "downloads")  # blueprints whose requests get an access line
TICKET_KEY = "ollamamq.ticket"  # where relay.serve_queued leaves the request's Ticket
OBSERVERS_KEY = "ollamamq.finished"  # who is handed each Finished record
ARRIVED_KEY = "ollamamq.arrived"  # monotonic time the request reached the app


@dataclass(frozen=True)
class Finished:
    """A proxied request once its answer has been sent (or the client left)."""

    user: str
    method: str
    path: str
    endpoint: str  # the URL rule, so metric labels stay bounded (no digests or model names)
    model: str | None
    backend: str | None
    status: int
    wait_ms: float | None  # time queued; None for calls that need no slot
    first_token_ms: float | None  # from arrival to the first body byte relayed
    duration_ms: float
    tokens_in: int
    tokens_out: int

    def as_dict(self) -> dict[str, Any]:
        """Stable keys, rounded times: what the JSON access line holds."""
        row = {name: getattr(self, name) for name in FIELDS}  # asdict() deep-copies: 4x slower
        for key in ("wait_ms", "first_token_ms", "duration_ms"):
            row[key] = None if row[key] is None else round(row[key], 1)
        return row


FIELDS = tuple(f.name for f in fields(Finished))
UNQUEUED = {  # what a call that took no backend slot records
    "model": None,
    "backend": None,
    "wait_ms": None,
    "first_token_ms": None,
    "tokens_in": 0,
    "tokens_out": 0,
}


def text_line(record: Finished) -> str:
    """The access line for people: key=value pairs in a fixed order."""
    return " ".join(f"{k}={'-' if v is None else v}" for k, v in record.as_dict().items())


def _ms(start: float, end: float | None) -> float | None:
    return None if end is None else (end - start) * 1000


def build(seen: dict[str, Any], ticket: Any, arrived: float) -> Finished:
    """The record, from what the response showed and what its Ticket (if queued) counted."""
    duration_ms = (time.monotonic() - arrived) * 1000
    if ticket is None:
        return Finished(**seen, duration_ms=duration_ms, **UNQUEUED)
    started = ticket.enqueued_at
    return Finished(
        **(seen | {"user": ticket.user}),
        model=ticket.model,
        backend=ticket.backend.name if ticket.backend else None,
        wait_ms=_ms(started, ticket.started_at),
        first_token_ms=_ms(started, ticket.first_byte_at),
        duration_ms=duration_ms,
        tokens_in=ticket.tokens_in,
        tokens_out=ticket.tokens_out,
    )


def _seen(response: Response) -> dict[str, Any]:
    """What is known when the view returns: who, what was called, the status sent."""
    from .identity import seen_user  # the one seam that says who someone is

    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    return {
        "user": seen_user(),
        "method": request.method,
        "path": request.path,
        "endpoint": rule,
        "status": response.status_code,
    }


def init_app(app: Flask, on_finish: list[Callable[[Finished], None]]) -> None:
    """After each proxied response has been sent, build its record and hand it on."""
    as_json = app.config["LOG_FORMAT"] == "json"

    def emit(record: Finished) -> None:
        if log.isEnabledFor(logging.INFO):
            line = json.dumps(record.as_dict()) if as_json else text_line(record)
            log.info("%s", line)

    observers = app.extensions[OBSERVERS_KEY] = [emit, *on_finish]  # tests may add their own

    @app.before_request
    def arrive() -> None:
        request.environ[ARRIVED_KEY] = time.monotonic()

    @app.after_request
    def finish(response: Response) -> Response:
        if request.blueprint not in PROXIED:
            return response
        seen, environ = _seen(response), request.environ

        def closed() -> None:  # registered after the relay's callbacks: the slot is released
            record = build(seen, environ.get(TICKET_KEY), environ[ARRIVED_KEY])
            for observe in observers:
                observe(record)

        response.call_on_close(closed)
        return response
