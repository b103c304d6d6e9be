"""A request's ticket, from submit to release: what the dispatcher and the relay share."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from gevent.event import Event
from werkzeug.exceptions import ServiceUnavailable

from .backends import Backend
from .fairshare import Waiting

WAITING, ACTIVE, DONE, CANCELLED = "waiting", "active", "done", "cancelled"
DRAINED = "drained"  # answered 503 because the proxy is shutting down
DRAIN_RETRY_AFTER = 5  # seconds: a restarted proxy, or another one, is usually there by then


class Draining(ServiceUnavailable):
    """The proxy is shutting down: the request is refused, to be retried elsewhere or later."""

    def __init__(self) -> None:
        message = "the proxy is shutting down; retry in a moment"
        super().__init__(message, retry_after=DRAIN_RETRY_AFTER)


class Ticket:
    """One request from submit to release.

    Its request greenlet waits on `granted`; the dispatcher sets `backend` and `state`.
    """

    __slots__ = (
        "id",
        "user",
        "model",
        "path",
        "item",
        "granted",
        "backend",
        "state",
        "enqueued_at",
        "started_at",
        "first_byte_at",
        "records",
        "tokens_in",
        "tokens_out",
        "reported",
        "failed",
        "abandoned",
        "on_abandon",
    )

    _ids = itertools.count(1)

    def __init__(
        self,
        user: str,
        model: str | None,
        path: str,
        estimate: float,
        max_output: int | None,
        backend: str | None = None,
    ) -> None:
        self.id = next(Ticket._ids)
        self.user = user
        self.model = model
        self.path = path
        self.enqueued_at = time.monotonic()
        self.item = Waiting(user, model, estimate, max_output, self, backend=backend)
        self.item.enqueued_at = self.enqueued_at
        self.granted = Event()
        self.backend: Backend | None = None
        self.state = WAITING
        self.started_at: float | None = None
        self.first_byte_at: float | None = None  # set by the relay when the first chunk passes
        self.records = 0  # content records relayed so far (one token each), set by the relay
        self.tokens_in = 0  # the backend's own counts, once its final record is seen
        self.tokens_out = 0
        self.reported = False  # the backend gave its counts; else release() charges the stream
        self.failed = False  # an error status or a broken stream: counted as an error
        self.abandoned = False  # the client hung up while it was being served
        self.on_abandon: Callable[[], None] | None = None

    @property
    def wait_ms(self) -> float:
        """Time spent queued."""
        end = self.started_at if self.started_at is not None else time.monotonic()
        return (end - self.enqueued_at) * 1000

    def wait(self) -> bool:
        """Block until granted a slot (True) or cancelled (False); raises Draining."""
        self.granted.wait()
        if self.state == DRAINED:
            raise Draining()
        return self.state == ACTIVE
