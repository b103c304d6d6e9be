"""A graceful drain on SIGTERM or SIGINT: no stream cut, no waiting client reset."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from flask import Flask

from .dispatcher import Dispatcher
from .supervisor import Supervisor

log = logging.getLogger(__name__)

CUT_GRACE_S = 5.0  # after the drain timeout, seconds the cut streams get to send their end


class Drain:
    """One graceful stop per process, begun by the first signal; a second exits at once.

    /health turns 503 and waiting requests get 503 with Retry-After at once; downloads stop
    and stay pending; active streams run to their end for up to DRAIN_TIMEOUT seconds, then
    end with an error record; then `finish` runs (close the listener, stop the services).
    """

    def __init__(self, app: Flask, finish: Callable[[], None]) -> None:
        self.app = app
        self.finish = finish
        self.greenlets = Supervisor("drain")
        self.started_at: float | None = None

    def on_signal(self, *_args: object) -> None:
        """The signal handler: hop into a greenlet, since a handler must not block the hub."""
        if self.started_at is not None:
            log.warning("second signal: exiting now, without waiting for the drain")
            os._exit(1)
        self.started_at = time.monotonic()
        self.greenlets.spawn("drain", self.run)

    def run(self) -> None:
        """Refuse, stop downloads, wait for the streams (cut them at the timeout), finish."""
        dispatcher: Dispatcher = self.app.extensions["ollamamq"]
        answered = dispatcher.drain()
        timeout = self.app.config["DRAIN_TIMEOUT"]
        log.info(
            "draining: %d waiting answered 503, %d streams may run for %g s",
            answered,
            dispatcher.active_count,
            timeout,
        )
        self.app.extensions["ollamamq.scheduler_keeper"].stop()
        with self.app.app_context():
            self.app.extensions["ollamamq.pulls"].stop()
        if not dispatcher.wait_idle(timeout):
            log.warning("drain timeout: cutting %d streams", dispatcher.cut_active())
            dispatcher.wait_idle(CUT_GRACE_S)
        log.info("drained in %.1f s", time.monotonic() - (self.started_at or time.monotonic()))
        self.finish()
