"""Several replicas, one fair queue: a replica's side of the queue shared through Redis.

A waiting client's connection, greenlet and ticket stay on the replica it reached; that
replica's Dispatcher keeps them as in one process (display, drain, positions). What is
global lives in Redis (ledger.py): who waits, who holds which backend's slots, and who is
granted next, decided by whichever replica holds the leader's term (leader.py). The local
grant loop never runs here: grants arrive on this replica's list in Redis.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial

import gevent
import redis
from gevent.event import Event
from werkzeug.exceptions import ServiceUnavailable

from .backends import Backend, BackendPool
from .dispatcher import Dispatcher
from .fairshare import FairQueue
from .leader import Leader
from .ledger import Active, Ledger, Op, cancel_op, release_op, submit_op
from .notices import Notices
from .ticket import ACTIVE, DRAINED, WAITING, Ticket

log = logging.getLogger(__name__)

BEAT_S = 0.5  # heartbeat period
REPLICA_TTL_S = 3.0  # a replica silent this long is dead: its slots are freed
SELF_FENCE_S = REPLICA_TTL_S - 1.0  # silent this long ourselves: cut our streams first
LEADER_TTL_S = 2.0  # a leader silent this long is replaced
RETRY_S = 0.2  # pause before sending again to an unreachable Redis
CLAIM_TTL_S = 3600  # a scheduled run claimed by one replica stays claimed this long
GRANT_WAIT_S = 1.0  # one wait for a grant; then the loop reports itself healthy


def default_replica_id() -> str:
    """Unique per process: gunicorn's workers share the host name."""
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisUnavailable(ServiceUnavailable):
    """The shared queue cannot be reached: new requests are refused until it is back."""

    def __init__(self) -> None:
        super().__init__("the shared queue (Redis) is unreachable; retry shortly", retry_after=2)


class SharedDispatcher(Dispatcher):
    """A replica's Dispatcher whose grants come from the cluster's leader.

    Changes to the shared record go through one outbox, sent in order by one greenlet in
    batches, so no method here yields and a Redis hiccup only delays them (every script
    is safe to send twice).
    """

    def __init__(
        self,
        pool: BackendPool,
        queue: FairQueue,
        max_queue: int,
        max_per_user: int,
        ledger: Ledger,
        replica: str,
        new_queue: Callable[[], FairQueue],
    ) -> None:
        super().__init__(pool, queue, max_queue, max_per_user)
        self.ledger = ledger
        self.replica = replica
        self.new_queue = new_queue  # a fresh policy for each term this replica leads
        self.leader: Leader | None = None
        self.redis_error: str | None = None
        self._tickets: dict[str, Ticket] = {}  # this replica's, waiting or active
        self.notices = Notices(ledger, self._lost)  # settings changed on any replica
        self._outbox: list[Op] = []
        self._has_mail = Event()
        self._epoch: str | None = None
        self._last_beat = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Join the cluster (raises redis.RedisError if Redis is unreachable), then serve."""
        self._beat()
        self.greenlets.loop("grants", self._receive_grants)
        self.greenlets.loop("outbox", self._send_outbox)
        self.greenlets.every("heartbeat", BEAT_S, self._heartbeat)
        heard = partial(self.greenlets.recovered, "changes")
        self.greenlets.loop("changes", self.notices.listen, heard)
        log.info("replica %s joined the shared queue at %s", self.replica, self.ledger.url)

    def stop(self) -> None:
        """Stop granting, hand back the term, and leave: what we hold is freed at once."""
        leader = self.leader
        super().stop()
        try:
            if leader is not None and leader.is_leading:
                leader.resign()
            if self._outbox:
                self.ledger.send(self._outbox)
            self.ledger.leave(self.replica)
        except redis.RedisError as exc:
            log.warning("replica %s left without telling Redis: %s", self.replica, exc)

    def health_problem(self) -> str | None:
        problems = [p for p in (super().health_problem(), self.redis_error) if p]
        return "; ".join(problems) or None

    def cluster_state(self) -> dict:
        """This replica's view of the cluster, for /health, /metrics and the admin."""
        state = {"replica": self.replica, "role": self.role, "redis": self.redis_error or "ok"}
        try:
            state |= {
                "leader": self.ledger.leader(),
                "replicas": self.ledger.replicas(),
                "inflight": self.ledger.inflight(),
            }
        except redis.RedisError as exc:
            state["redis"] = f"redis unreachable: {exc}"
        return state

    @property
    def role(self) -> str:
        return "leader" if self.leader is not None and self.leader.is_leading else "follower"

    # -- the Dispatcher's calls, also told to the shared record ------------------------------

    def submit(self, user, model, path, estimate=0.0, max_output=None, backend=None) -> Ticket:
        if self.redis_error is not None:
            raise RedisUnavailable()
        ticket = super().submit(user, model, path, estimate, max_output, backend)
        self._tickets[self._key(ticket)] = ticket
        self._post(submit_op(self._key(ticket), self._request(ticket)))
        return ticket

    def release(self, ticket: Ticket) -> None:
        if ticket.state != ACTIVE:
            return
        super().release(ticket)
        key = self._key(ticket)
        del self._tickets[key]
        outcome = {"tokens_in": ticket.tokens_in, "tokens_out": ticket.tokens_out}
        self._post(release_op(key, outcome))

    def requeue(self, ticket: Ticket, rest_s: float) -> None:
        if ticket.state != ACTIVE:
            return
        super().requeue(ticket, rest_s)
        key = self._key(ticket)
        if ticket.state == WAITING:
            self._post(release_op(key, {"rest_s": rest_s}, requeue=self._request(ticket)))
        else:  # refused: the proxy is draining
            self._tickets.pop(key, None)
            self._post(release_op(key, {"unused": True}))

    def configure_user(self, user: str, weight: float, vip: bool, blocked: bool) -> None:
        super().configure_user(user, weight, vip, blocked)
        if self.leader is not None and self.leader.is_leading:
            self.leader.configure(user, weight, vip, blocked)

    def _drop_waiting(self, ticket: Ticket, reason: str) -> bool:
        if not super()._drop_waiting(ticket, reason):
            return False
        self._withdraw(ticket)
        return True

    def _refuse(self, ticket: Ticket) -> None:
        super()._refuse(ticket)
        if ticket.state == DRAINED:
            self._withdraw(ticket)

    def _withdraw(self, ticket: Ticket) -> None:
        key = self._key(ticket)
        if self._tickets.pop(key, None) is not None:
            self._post(cancel_op(key))

    def _run(self) -> None:
        raise AssertionError("grants come from the leader")  # start() never spawns it

    def _grant_if_alone(self) -> None:
        pass  # alone here is not alone in the shared queue: the leader grants

    def claim(self, name: str) -> bool:
        """Whether this replica is the one to do `name` (a scheduled run) for the next hour.

        If Redis cannot say, yes: a window opened twice only runs more pulls at once
        (each job is still claimed in the database by one replica), a missed one waits a day.
        """
        try:
            return self.ledger.claim(name, self.replica, CLAIM_TTL_S)
        except redis.RedisError as exc:
            log.warning(
                "replica %s: Redis cannot say who runs %s; running it: %s", self.replica, name, exc
            )
            return True

    # -- grants ------------------------------------------------------------------------------

    def _receive_grants(self) -> None:
        while True:
            try:
                grant = self.ledger.next_grant(self.replica, GRANT_WAIT_S)
            except redis.RedisError as exc:
                self._lost(exc)
                gevent.sleep(RETRY_S)
                continue
            if grant is not None:
                self._take(*grant)
            self.greenlets.recovered("grants")

    def _take(self, key: str, backend_name: str) -> None:
        ticket = self._tickets.get(key)
        backend = self._backend(backend_name)
        if ticket is None or backend is None or not self.queue.remove(ticket.item):
            if backend is None:
                log.error("granted %s on %s, which this replica does not know", key, backend_name)
            self._post(release_op(key, {"unused": True}))  # its client left meanwhile
            return
        self._grant(ticket, backend)

    def _backend(self, name: str) -> Backend | None:
        return next((b for b in self.pool if b.name == name), None)

    # -- the outbox --------------------------------------------------------------------------

    def _post(self, op: Op) -> None:
        self._outbox.append(op)
        self._has_mail.set()

    def _send_outbox(self) -> None:
        while True:
            self._has_mail.wait()
            self._has_mail.clear()
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    self.ledger.send(batch)
                except redis.RedisError as exc:
                    self._outbox[:0] = batch  # in order, before anything posted since
                    self._lost(exc)
                    gevent.sleep(RETRY_S)
            self.greenlets.recovered("outbox")

    # -- the heartbeat -----------------------------------------------------------------------

    def _heartbeat(self) -> None:
        try:
            self._beat()
            self._elect()
        except redis.RedisError as exc:
            self._lost(exc)
            silent = time.monotonic() - self._last_beat
            if silent > SELF_FENCE_S and self._active:
                log.error(
                    "replica %s: no heartbeat for %.1f s; cutting %d streams so that the "
                    "others may reuse their slots",
                    self.replica,
                    silent,
                    self.cut_active(),
                )

    def _beat(self) -> None:
        epoch, unlisted = self.ledger.beat(self.replica, self._summary(), REPLICA_TTL_S)
        if self._epoch is not None and (epoch != self._epoch or unlisted):
            self._put_back()
        self._epoch = epoch
        self._last_beat = time.monotonic()
        if self.redis_error is not None:
            log.warning("replica %s: Redis is back", self.replica)
            self.redis_error = None
        if self._outbox:
            self._has_mail.set()

    def _put_back(self) -> None:
        """Redis lost our tickets (it restarted, or we were taken for dead): restore them."""
        tickets = list(self._tickets.items())
        log.warning("replica %s: Redis lost %d tickets; restoring", self.replica, len(tickets))
        for key, ticket in tickets:
            if ticket.state == WAITING:
                self.ledger.send([submit_op(key, self._request(ticket))])
            elif ticket.state == ACTIVE and ticket.backend is not None:
                held = Active(ticket.backend.name, self.replica, ticket.item.charged, ticket.user)
                if not self.ledger.reassert_active(key, held, ticket.backend.slots):
                    log.warning("no slot left for %s after the loss; its stream is cut", key)
                    if ticket.on_abandon is not None:
                        ticket.on_abandon()

    def _elect(self) -> None:
        if self.leader is not None and self.leader.is_leading:
            return
        holder = self.ledger.lead(self.replica, LEADER_TTL_S)
        if holder is None:
            return
        log.info("replica %s leads the shared queue (term %s)", self.replica, holder)
        account = self.queue.accounts.get
        leader = Leader(self.ledger, holder, self.pool, self.new_queue(), account, LEADER_TTL_S)
        self.leader = leader
        self.greenlets.spawn("leader", leader.run)

    def _lost(self, error: Exception) -> None:
        if self.redis_error is None:
            log.error("replica %s: Redis is unreachable: %s", self.replica, error)
        self.redis_error = f"redis unreachable: {error}"

    # -- helpers -----------------------------------------------------------------------------

    def _key(self, ticket: Ticket) -> str:
        return f"{self.replica}/{ticket.id}"

    @staticmethod
    def _request(ticket: Ticket) -> dict:
        item = ticket.item
        return {
            "user": item.user,
            "model": item.model,
            "estimate": item.estimate,
            "max_output": item.max_output,
            "backend": item.backend,
            "at": time.time() - (time.monotonic() - ticket.enqueued_at),
        }

    def _summary(self) -> dict:
        return {
            "role": self.role,
            "waiting": self.waiting_count,
            "active": self.active_count,
            "served": self.served,
            "errors": self.errors,
            "at": time.time(),
        }
