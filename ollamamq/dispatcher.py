"""The dispatcher: sole owner of waiting requests, backend slots and served-work counters."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import gevent
from gevent.event import Event
from werkzeug.exceptions import Forbidden, HTTPException

from .backends import Backend, BackendPool
from .fairshare import FairQueue
from .metrics import Throughput, UserStats
from .placement import Slots
from .snapshot import Snapshot, TicketView, UserView
from .supervisor import Supervisor
from .ticket import ACTIVE, CANCELLED, DONE, DRAINED, WAITING, Draining, Ticket

log = logging.getLogger(__name__)

LOOP = "dispatcher loop"


class QueueFull(HTTPException):
    """No room for another waiting request: 429 (this user's queue) or 503 (everyone's)."""

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message)
        self.code = status
        self.retry_after = retry_after  # errors.py sends it as Retry-After


class UserBlocked(Forbidden):
    """The user is blocked by an operator."""


class Dispatcher:
    """Owns every waiting request and backend slot.

    Request greenlets only call submit(), abandon() and release(); the dispatcher greenlet
    grants, except to a request alone in the queue (see _grant_if_alone). No method yields
    between reading and writing state, so gevent needs no locks here.
    """

    replica = ""  # this process's name among replicas of a shared queue; "" alone

    def __init__(self, pool: BackendPool, queue: FairQueue, max_queue: int, max_per_user: int):
        self.pool = pool
        self.queue = queue
        self.max_queue = max_queue
        self.max_per_user = max_per_user
        self.users: dict[str, UserStats] = {}
        self.throughput = Throughput()
        self.served = 0
        self.errors = 0
        self._active: dict[Ticket, None] = {}
        self.started_at = time.time()
        self._service_s = 1.0  # moving average of service time, for Retry-After
        self._wake = Event()
        self.greenlets = Supervisor("dispatcher")
        self.is_draining = False
        self._idle = Event()  # set while draining once no request holds a slot

    def start(self) -> None:
        """Spawn the dispatcher greenlet (restarted if it crashes)."""
        self.greenlets.loop(LOOP, self._run)

    def stop(self) -> None:
        """Stop granting."""
        self.greenlets.stop()

    def health_problem(self) -> str | None:
        """Why the dispatcher is not healthy (its loop crashed and is not back), or None."""
        return self.greenlets.health_problem()

    # cluster.SharedDispatcher, one replica of a shared queue, answers these otherwise.

    def cluster_state(self) -> dict | None:
        """What the shared queue's record says of all replicas (None: alone)."""
        return None

    def claim(self, name: str) -> bool:
        """Whether this process does the scheduled run `name` (alone: always)."""
        return True

    def drain(self) -> int:
        """Shutting down: refuse new requests and answer every waiting one; how many waited."""
        self.is_draining = True
        waiting = self._waiting()
        for ticket in waiting:
            self._refuse(ticket)
        self._idle_if_drained()
        return len(waiting)

    def wait_idle(self, timeout: float) -> bool:
        """While draining, block until no request holds a slot (True) or `timeout` passes."""
        return self._idle.wait(timeout)

    def cut_active(self) -> int:
        """End every active stream now; each ends with the relay's error record."""
        cut = [t for t in self._active if t.on_abandon is not None]
        for ticket in cut:
            ticket.on_abandon()
        return len(cut)

    def _idle_if_drained(self) -> None:
        if self.is_draining and not self._active:
            self._idle.set()

    def _refuse(self, ticket: Ticket) -> None:
        if self.queue.remove(ticket.item):
            ticket.state = DRAINED
            ticket.granted.set()

    def wake(self) -> None:
        """Ask the dispatcher greenlet to look for grants (a slot or a backend changed)."""
        self._wake.set()

    def submit(
        self,
        user: str,
        model: str | None,
        path: str,
        estimate: float = 0.0,
        max_output: int | None = None,
        backend: str | None = None,
    ) -> Ticket:
        """Queue a request behind its user's others (on `backend` only, if named).

        Raises QueueFull, UserBlocked or Draining.
        """
        if self.is_draining:
            raise Draining()
        account = self.queue.account(user)
        if account.is_blocked:
            raise UserBlocked(f"user {user!r} is blocked")
        self._check_room(user)
        ticket = Ticket(user, model, path, estimate, max_output, backend)
        self.queue.push(ticket.item)
        self._stats(user).last_seen = time.time()
        self._grant_if_alone()
        return ticket

    def _grant_if_alone(self) -> None:
        """Grant a request alone in the queue at once: there is nobody to be fair to.

        It spares the hop through the dispatcher greenlet (two switches) on every request
        of an idle proxy; anything else waits for the dispatcher's fair-share round.
        """
        if len(self.queue) == 1:
            self._grant_all()
        if len(self.queue):
            self._wake.set()

    def abandon(self, ticket: Ticket) -> None:
        """The client went away: drop a waiting ticket, or cut an active one's stream."""
        if ticket.state == WAITING:
            self._drop_waiting(ticket, "left while queued")
        elif ticket.state == ACTIVE and ticket.on_abandon is not None:
            ticket.abandoned = True
            ticket.on_abandon()

    def cancel(self, ticket_id: int) -> bool:
        """An operator withdraws a waiting request; False if it is not waiting."""
        ticket = next((t for t in self._waiting() if t.id == ticket_id), None)
        return ticket is not None and self._drop_waiting(ticket, "cancelled by an operator")

    def _drop_waiting(self, ticket: Ticket, reason: str) -> bool:
        if not self.queue.remove(ticket.item):
            return False
        ticket.state = CANCELLED
        self._stats(ticket.user).cancelled += 1
        ticket.granted.set()
        log.info("a request of user %s for %s was %s", ticket.user, ticket.path, reason)
        return True

    def is_blocked(self, user: str) -> bool:
        """Whether an operator blocked `user`."""
        account = self.queue.accounts.get(user)
        return account is not None and account.is_blocked

    def configure_user(self, user: str, weight: float, vip: bool, blocked: bool) -> None:
        """Set a user's share weight, absolute priority and blocked flag."""
        self.queue.configure(user, weight, vip, blocked)
        self._stats(user)  # so the user is listed even before any request
        self._wake.set()  # a new VIP may now go first

    def requeue(self, ticket: Ticket, rest_s: float) -> None:
        """The backend was busy: rest it, free the slot, and let the ticket wait at the head."""
        if ticket.state != ACTIVE:
            return
        backend = ticket.backend
        assert backend is not None
        backend.active -= 1
        backend.rest_until = time.monotonic() + rest_s
        self.greenlets.spawn("rest over", self._end_rest, backend)
        del self._active[ticket]
        ticket.state, ticket.backend, ticket.started_at = WAITING, None, None
        ticket.granted = Event()
        self.queue.requeue(ticket.item)
        if self.is_draining:
            self._refuse(ticket)
            self._idle_if_drained()
        self._wake.set()

    def _end_rest(self, backend: Backend) -> None:
        """Wake the grants once the rest is over by the clock the policy reads.

        A hub timer may fire a little before time.monotonic() reaches `rest_until` (the
        loop's clock lags under load); a wake then would find the backend still resting
        and nothing would wake the dispatcher again.
        """
        while (left := backend.rest_until - time.monotonic()) > 0:
            gevent.sleep(left)
        self.wake()

    def release(self, ticket: Ticket) -> None:
        """Free the ticket's slot and count its work; safe to call more than once."""
        if ticket.state != ACTIVE:
            return
        ticket.state = DONE
        assert ticket.backend is not None and ticket.started_at is not None
        ticket.backend.active -= 1
        del self._active[ticket]
        elapsed = time.monotonic() - ticket.started_at
        self._service_s += 0.2 * (elapsed - self._service_s)
        if not ticket.reported:  # abandoned, cut, timed out or never told: what was streamed
            ticket.tokens_in, ticket.tokens_out = round(ticket.item.estimate), ticket.records
        self._count(ticket)
        self.queue.complete(ticket.user, ticket.item.charged, ticket.tokens_in, ticket.tokens_out)
        if not ticket.failed and ticket.model:
            ticket.backend.loaded |= {ticket.model}  # Ollama keeps it loaded for a while
        self._idle_if_drained()
        self._wake.set()

    def snapshot(self) -> Snapshot:
        """A frozen copy of the state for display."""
        now = time.monotonic()
        active_by_user = Counter(t.user for t in self._active)
        return Snapshot(
            backends=tuple(b.status() for b in self.pool),
            waiting=tuple(_view(t, now - t.enqueued_at) for t in self._waiting()),
            active=tuple(_view(t, now - (t.started_at or now)) for t in self._active),
            users=tuple(self._user_view(u, s, active_by_user[u]) for u, s in self.users.items()),
            served=self.served,
            errors=self.errors,
            throughput=tuple(self.throughput.series(time.time())),
            started_at=self.started_at,
            fairness=self.queue.fairness,
        )

    def positions(self, user: str) -> list[tuple[Ticket, int, float]]:
        """Each waiting request of `user` with its estimated place in line and wait in seconds.

        Users take turns, so the k-th request of a user is preceded by up to k requests of
        every other waiting user (and one more of those ahead of it in the order).
        """
        order = self.queue.order()
        if user not in order:
            return []
        depth = {u: self.queue.waiting(u) for u in order}
        ahead = order[: order.index(user)]
        slots = max(1, sum(b.slots for b in self.pool))
        tickets = [item.payload for item in self.queue.accounts[user].queue]
        placed = []
        for k, ticket in enumerate(tickets):
            before = sum(min(d, k + (u in ahead)) for u, d in depth.items() if u != user) + k
            placed.append((ticket, before + 1, (before // slots + 1) * self._service_s))
        return placed

    @property
    def service_s(self) -> float:
        """Recent average time a request holds a slot."""
        return self._service_s

    def _waiting(self) -> list[Ticket]:
        accounts = self.queue.accounts
        return [item.payload for u in self.queue.order() for item in accounts[u].queue]

    def _user_view(self, user: str, stats: UserStats, active: int) -> UserView:
        account = self.queue.account(user)
        return UserView(
            user=user,
            waiting=len(account.queue),
            active=active,
            served=stats.served,
            errors=stats.errors,
            cancelled=stats.cancelled,
            tokens_in=stats.tokens_in,
            tokens_out=stats.tokens_out,
            avg_wait_ms=stats.avg_wait_ms(),
            p95_wait_ms=stats.p95_wait_ms(),
            last_seen=stats.last_seen,
            blocked=account.is_blocked,
            vip=account.is_vip,
            weight=account.weight,
            service=account.counter,
        )

    @property
    def waiting_count(self) -> int:
        """Requests waiting for a slot."""
        return len(self.queue)

    @property
    def active_count(self) -> int:
        """Requests holding a slot."""
        return len(self._active)

    def _check_room(self, user: str) -> None:
        slots = max(1, sum(b.slots for b in self.pool))
        if self.queue.waiting(user) >= self.max_per_user:
            wait = self._service_s * self.queue.waiting(user) / slots
            raise QueueFull(
                f"user {user!r} already has {self.max_per_user} requests waiting",
                429,
                max(1, math.ceil(wait)),
            )
        if len(self.queue) >= self.max_queue:
            wait = self._service_s * len(self.queue) / slots
            raise QueueFull(
                f"the queue is full ({self.max_queue} requests waiting)",
                503,
                max(1, math.ceil(wait)),
            )

    def _run(self) -> None:
        while True:
            self._grant_all()  # first, so a restarted loop serves who waited while it was down
            self.greenlets.recovered(LOOP)
            self._wake.wait()
            self._wake.clear()

    def _grant_all(self) -> None:
        for ticket in self._active:  # streams running long count before they end
            self.queue.progress(ticket.item, ticket.records)
        backends = self.pool.backends
        now = time.monotonic()
        slots = Slots([b.view(now) for b in backends])  # one picture for the whole round
        while len(self.queue):
            choice = self.queue.grant(slots)
            if choice is None:
                return
            item, index = choice
            self._grant(item.payload, backends[index])
            slots.take(index)

    def _grant(self, ticket: Ticket, backend: Backend) -> None:
        backend.active += 1
        ticket.backend = backend
        ticket.state = ACTIVE
        ticket.started_at = time.monotonic()
        self._active[ticket] = None
        self._stats(ticket.user).add_wait(ticket.wait_ms)
        ticket.granted.set()

    def _count(self, ticket: Ticket) -> None:
        """Tokens count whatever the ending (the backend made them); the outcome once."""
        stats = self._stats(ticket.user)
        stats.last_seen = time.time()
        stats.tokens_in += ticket.tokens_in
        stats.tokens_out += ticket.tokens_out
        served = not (ticket.abandoned or ticket.failed)
        self.throughput.add(stats.last_seen, int(served), ticket.tokens_in + ticket.tokens_out)
        if ticket.abandoned:
            stats.cancelled += 1
        elif ticket.failed:
            stats.errors += 1
            self.errors += 1
        else:
            stats.served += 1
            self.served += 1

    def _stats(self, user: str) -> UserStats:
        stats = self.users.get(user)
        if stats is None:
            stats = self.users[user] = UserStats()
        return stats


def _view(ticket: Ticket, seconds: float) -> TicketView:
    backend = ticket.backend.name if ticket.backend else None
    return TicketView(
        ticket.id, ticket.user, ticket.model, ticket.path, backend, seconds, ticket.records
    )
