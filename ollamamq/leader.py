"""The leader: while its replica holds the term, it grants for every replica, through Redis.

It keeps one FairQueue over the waiting requests of all replicas (the same pure policy as
one process), fed by the event stream; every grant is a GRANT script that checks the
fencing token and the backend's in-flight count in Redis, so a deposed leader, or a picture
that lags, can never put a backend over its slots.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import redis

from .backends import Backend, BackendPool
from .fairshare import FairQueue, UserAccount, Waiting
from .ledger import Active, Ledger
from .placement import BackendView, Slots

log = logging.getLogger(__name__)

GRANTED, GONE, FENCED, FULL = 1, 0, -1, -2
TERM_GRACE_S = 1.0  # a new term grants only after every replica had a beat to put back its own
EVENT_WAIT_MS = 100  # the longest a change in backends or a rest's end waits for a grant


class Leader:
    """Grants for all replicas during one term; run() returns when the term ends."""

    def __init__(
        self,
        ledger: Ledger,
        holder: str,
        pool: BackendPool,
        queue: FairQueue,
        settings_of: Callable[[str], UserAccount | None],
        term_s: float,
    ) -> None:
        self.ledger = ledger
        self.holder = holder  # the fencing token: "<replica>#<term>"
        self.pool = pool
        self.queue = queue
        self.settings_of = settings_of  # the operators' weight / vip / blocked of a user
        self.term_s = term_s
        self.is_leading = True
        self.waiting: dict[str, Waiting] = {}
        self.active: dict[str, tuple[str, Waiting]] = {}  # ticket -> (backend, item)
        self.inflight: Counter[str] = Counter()
        self.rest_until: dict[str, float] = {}
        self._last_event = "0-0"

    def run(self) -> None:
        """Lead until the term is lost or Redis fails, then step down."""
        try:
            self._take_over()
            grants_from = time.monotonic() + TERM_GRACE_S
            renew_at = 0.0
            while True:
                now = time.monotonic()
                if now >= renew_at:
                    if not self._keep_term():
                        return
                    renew_at = now + self.term_s / 4
                for event in self.ledger.events(self._last_event, EVENT_WAIT_MS):
                    self._apply(*event)
                if time.monotonic() >= grants_from and not self._grant_round():
                    return
        except redis.RedisError as exc:
            log.warning("leader %s steps down: Redis failed: %s", self.holder, exc)
        finally:
            self.is_leading = False

    def configure(self, user: str, weight: float, vip: bool, blocked: bool) -> None:
        """An operator changed a user's settings (on any replica: they are reloaded on all)."""
        self.queue.configure(user, weight, vip, blocked)

    def resign(self) -> None:
        """End the term now, so another replica need not wait for it to lapse."""
        self.is_leading = False
        try:
            self.ledger.renew(self.holder, 0)
        except redis.RedisError:
            pass  # it lapses on its own

    def _keep_term(self) -> bool:
        if not self.ledger.renew(self.holder, self.term_s):
            log.warning("leader %s: the term is over", self.holder)
            return False
        for replica in self.ledger.reap():
            log.warning("replica %s stopped beating: its slots are freed", replica)
        self.ledger.save_counters({u: a.counter for u, a in self.queue.accounts.items()})
        return True

    def _take_over(self) -> None:
        waiting, active, self._last_event, counters = self.ledger.take_over()
        for user, counter in counters.items():
            account = self._account(user)
            account.counter, account.is_new = counter, False
        for ticket, held in active.items():
            item = Waiting(held.user, None, payload=ticket, charged=held.charged)
            self.active[ticket] = (held.backend, item)
            self.inflight[held.backend] += 1
        for ticket, request in sorted(waiting.items(), key=lambda pair: pair[1]["at"]):
            self._add(ticket, request)
        log.info("leader %s: %d waiting, %d active", self.holder, len(waiting), len(active))

    def _account(self, user: str) -> UserAccount:
        known = user in self.queue.accounts
        account = self.queue.account(user)
        settings = None if known else self.settings_of(user)
        if settings is not None:
            self.queue.configure(user, settings.weight, settings.is_vip, settings.is_blocked)
        return account

    def _apply(self, event_id: str, kind: str, ticket: str, data: dict) -> None:
        self._last_event = event_id
        if kind == "submit":
            self._add(ticket, data)
        elif kind == "cancel":
            item = self.waiting.pop(ticket, None)
            if item is not None:
                self.queue.remove(item)
        elif ticket in self.active:
            self._end(ticket, kind, data)

    def _add(self, ticket: str, request: dict) -> None:
        if ticket in self.waiting or ticket in self.active:
            return
        self._account(request["user"])
        item = Waiting(
            request["user"],
            request["model"],
            request["estimate"],
            request["max_output"],
            payload=ticket,
            backend=request["backend"],
            enqueued_at=request["at"],
        )
        self.waiting[ticket] = item
        self.queue.push(item)

    def _end(self, ticket: str, kind: str, data: dict) -> None:
        backend, item = self.active.pop(ticket)
        self.inflight[backend] -= 1
        if kind == "requeue":
            self.rest_until[backend] = time.monotonic() + data["rest_s"]
            self.waiting[ticket] = item
            self.queue.requeue(item)  # refunds the grant's charge
        elif "tokens_in" in data:
            self.queue.complete(item.user, item.charged, data["tokens_in"], data["tokens_out"])
        elif data.get("unused"):  # its client had left: refund the charge
            self._refund(item)

    def _refund(self, item: Waiting) -> None:
        self.queue.requeue(item)
        self.queue.remove(item)

    def _grant_round(self) -> bool:
        """Grant while slots are free; False if the term turned out to be over."""
        backends = self.pool.backends
        now = time.monotonic()
        slots = Slots([self._view(b, now) for b in backends])
        while len(self.queue):
            choice = self.queue.grant(slots)
            if choice is None:
                return True
            item, index = choice
            backend = backends[index]
            ticket = item.payload
            held = Active(backend.name, ticket.rsplit("/", 1)[0], item.charged, item.user)
            result = self.ledger.grant(self.holder, ticket, held, backend.slots)
            if result == GRANTED:
                del self.waiting[ticket]
                self.active[ticket] = (backend.name, item)
                self.inflight[backend.name] += 1
                slots.take(index)
            elif result == GONE:  # withdrawn: its cancel event is on its way
                del self.waiting[ticket]
                self._refund(item)
            elif result == FULL:  # our count lagged behind the record: read it again
                self.queue.requeue(item)
                self.inflight = Counter(self.ledger.inflight())
                return True
            else:
                log.warning("leader %s: fenced off by a newer term", self.holder)
                self.queue.requeue(item)
                return False
        return True

    def _view(self, backend: Backend, now: float) -> BackendView:
        used = self.inflight[backend.name]
        resting = now < self.rest_until.get(backend.name, 0.0)
        free = 0 if resting else max(0, backend.slots - used)
        return BackendView(backend.name, free, used, backend.is_up, backend.models, backend.loaded)
