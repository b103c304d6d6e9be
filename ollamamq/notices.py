"""Settings changed on one replica, reloaded on every replica: topics on a Redis channel."""

from __future__ import annotations

import logging
from collections.abc import Callable

import gevent
import redis

from .ledger import Ledger

log = logging.getLogger(__name__)

LISTEN_WAIT_S = 1.0  # one wait for a notice; then the listener reports itself healthy
RETRY_S = 0.2  # pause before listening again to an unreachable Redis


class Notices:
    """Announce that a topic (users, keys) changed in the database; reload it when told.

    A notice missed while Redis was unreachable is not lost: on hearing Redis again every
    topic is reloaded once.
    """

    def __init__(self, ledger: Ledger, on_error: Callable[[Exception], None]) -> None:
        self.ledger = ledger
        self.on_error = on_error  # Redis failed: the owner marks itself degraded
        self._reloads: dict[str, Callable[[], None]] = {}  # topic -> reload

    def on_change(self, topic: str, reload: Callable[[], None]) -> None:
        """Call `reload` whenever a replica (this one too) announces a change to `topic`."""
        self._reloads[topic] = reload

    def announce(self, topic: str) -> None:
        try:
            self.ledger.publish(topic)
        except redis.RedisError as exc:
            self.on_error(exc)  # the others reload everything once they hear Redis again

    def listen(self, heard: Callable[[], None]) -> None:
        """The listener's loop; `heard` after each wait, to report it alive."""
        while True:
            try:
                self._hear(heard)
            except redis.RedisError as exc:
                self.on_error(exc)
                gevent.sleep(RETRY_S)

    def _hear(self, heard: Callable[[], None]) -> None:
        channel = self.ledger.listen()
        try:
            for reload in self._reloads.values():  # whatever changed while we could not hear
                reload()
            while True:
                message = channel.get_message(timeout=LISTEN_WAIT_S)
                reload = self._reloads.get(message["data"].decode()) if message else None
                if reload is not None:
                    reload()
                heard()
        finally:
            channel.close()
