"""The pure scheduling policy: which waiting request goes next, and to which backend.

No gevent, no Flask, no I/O: the dispatcher feeds it plain data and acts on its answers.
Two fairness modes:
- "requests": round-robin across users with waiting requests, one grant per user per turn
  (the seed's policy).
- "tokens": the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
  Models" (OSDI 2024): the backlogged user with the least service received goes next.
Both keep each user's own requests in FIFO order.

No starvation. Ties go to the head request that has waited longest, then to the earlier
arrival. "requests": a user joining the backlog goes behind everyone waiting, so a request at
the head of its user's queue is granted before any other user's second grant and before any
user that joins after it. "tokens": a user never granted before starts no lower than the users
granted and served last (within the backlog's counters). While a request waits, its user's
counter x stays put; others go first only at a counter of at most x (below x if they joined
after it), each at most (x - m) // q + 1 times (m: the least waiting counter when it reached
the head, q: the smallest charge), and every new id starts at least q above the counter of
the grant before it, so new ids cannot hold the least counter down.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

FAIRNESS_MODES = ("tokens", "requests")
OUTPUT_SMOOTHING = 0.3  # weight of the newest request in a user's mean output


def normalize_model(name: str) -> str:
    """Ollama's name matching: case-insensitive, with ":latest" when no tag is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(eq=False)
class Waiting:
    """A queued request as the policy sees it; `payload` is the dispatcher's own object."""

    user: str
    model: str | None
    estimate: float = 0.0  # input tokens guessed before dispatch
    max_output: int | None = None  # the client's output limit (num_predict, max_tokens)
    payload: Any = None
    charged: float = 0.0  # what the grant charged: input estimate and expected output
    backend: str | None = None  # only this backend may take it (operator model loads)
    enqueued_at: float = 0.0  # when it was queued (any clock): ties go to the longest waiting
    seq: int = -1  # arrival number, set by FairQueue.push: the last tie-break


@dataclass(frozen=True)
class BackendView:
    """What the policy needs to know about a backend at one instant."""

    name: str
    free: int
    active: int
    is_up: bool = True
    models: frozenset[str] | None = None  # None: not known yet, may serve any model
    loaded: frozenset[str] = frozenset()

    def has_model(self, model: str | None) -> bool:
        """Whether this backend can serve `model` (any backend serves a request without one)."""
        return model is None or self.models is None or model in self.models


@dataclass
class UserAccount:
    """Per-user scheduling state: the FIFO queue and, for "tokens", the service counter."""

    queue: deque[Waiting] = field(default_factory=deque)
    counter: float = 0.0
    weight: float = 1.0
    is_vip: bool = False
    is_blocked: bool = False
    position: int = -1  # "requests": its latest grant's number, lifted to the latest on joining
    is_new: bool = True  # never granted: joins no lower than the latest users served
    mean_output: float | None = None  # moving average of the user's output tokens per request


def pick_backend(
    backends: Sequence[BackendView], model: str | None, turn: int = 0, only: str | None = None
) -> int | None:
    """Index of the backend that should take a request for `model`, or None if none can now.

    Healthy backends with the model and a free slot come first; backends that are down
    are tried only when no healthy one has the model. Among candidates: model already
    loaded, then fewest active requests, then round-robin by `turn` on ties. `only` pins
    the request to the backend of that name.
    """
    holders = [i for i, b in enumerate(backends) if b.has_model(model) and only in (None, b.name)]
    healthy = [i for i in holders if backends[i].is_up]
    free = [i for i in (healthy or holders) if backends[i].free > 0]
    if not free:
        return None

    def rank(i: int) -> tuple[bool, int]:
        return model not in backends[i].loaded, backends[i].active

    best = min(rank(i) for i in free)
    tied = [i for i in free if rank(i) == best]
    return tied[turn % len(tied)]


class FairQueue:
    """Per-user FIFO queues and the order in which users are served."""

    def __init__(self, fairness: str = "tokens", output_weight: float = 2.0) -> None:
        if fairness not in FAIRNESS_MODES:
            raise ValueError(f"fairness must be one of {FAIRNESS_MODES}, not {fairness!r}")
        self.fairness = fairness
        self.output_weight = output_weight
        self.accounts: dict[str, UserAccount] = {}
        self._backlogged: dict[str, None] = {}  # users with waiting requests, by arrival
        self._size = 0
        self._turn = 0  # grants so far
        self._arrivals = itertools.count()
        self._last_granted: str | None = None
        self._last_completed: str | None = None
        self._last_user: str | None = None  # the last user to leave the backlog

    def __len__(self) -> int:
        return self._size

    def account(self, user: str) -> UserAccount:
        """The user's account, created on first sight."""
        acct = self.accounts.get(user)
        if acct is None:
            acct = self.accounts[user] = UserAccount()
        return acct

    def waiting(self, user: str) -> int:
        """How many requests `user` has waiting."""
        acct = self.accounts.get(user)
        return len(acct.queue) if acct else 0

    def push(self, item: Waiting) -> None:
        """Queue `item` behind its user's other waiting requests."""
        acct = self.account(item.user)
        item.seq = next(self._arrivals)
        if not acct.queue:
            self._join_backlog(item.user, acct)
        acct.queue.append(item)
        self._size += 1

    def requeue(self, item: Waiting) -> None:
        """Put a granted item back at the head of its user's queue and refund its charge."""
        acct = self.account(item.user)
        self._charge(acct, -item.charged)
        if not acct.queue:
            self._backlogged[item.user] = None
        acct.queue.appendleft(item)
        self._size += 1

    def remove(self, item: Waiting) -> bool:
        """Take a waiting item out (its client left); False if it was not waiting."""
        acct = self.accounts.get(item.user)
        if acct is None or item not in acct.queue:
            return False
        acct.queue.remove(item)
        self._size -= 1
        if not acct.queue:
            self._leave_backlog(item.user)
        return True

    def grant(self, backends: Sequence[BackendView]) -> tuple[Waiting, int] | None:
        """Pop the next request that some backend can take now, with that backend's index.

        The first user in order usually fits, so it is found in one pass; the full order is
        sorted only when its model has no free slot.
        """
        if not self._backlogged:
            return None
        first = min(self._backlogged, key=self._order_key())
        for user in itertools.chain([first], self._candidates_after(first)):
            acct = self.accounts[user]
            head = acct.queue[0]
            index = pick_backend(backends, head.model, self._turn, head.backend)
            if index is not None:
                return self._pop(user, acct), index
        return None

    def complete(self, user: str, charged: float, input_tokens: int, output_tokens: int) -> None:
        """Replace what the grant charged with the backend's own token counts."""
        acct = self.accounts.get(user)
        if acct is not None:
            self._charge(acct, input_tokens + self.output_weight * output_tokens - charged)
            self._last_completed = user
            previous = output_tokens if acct.mean_output is None else acct.mean_output
            acct.mean_output = previous + OUTPUT_SMOOTHING * (output_tokens - previous)

    def progress(self, item: Waiting, output_tokens: int) -> None:
        """Charge a running request's output so far where it passes what its grant charged."""
        owed = item.estimate + self.output_weight * output_tokens - item.charged
        acct = self.accounts.get(item.user)
        if owed > 0 and acct is not None:
            item.charged += owed
            self._charge(acct, owed)

    def service(self, user: str) -> float:
        """Weighted service counter of `user` (what "tokens" fairness equalizes)."""
        acct = self.accounts.get(user)
        return acct.counter if acct else 0.0

    def order(self) -> list[str]:
        """Backlogged users in the order they would be considered now."""
        return self._candidates()

    def _candidates(self) -> list[str]:
        """Backlogged users in serving order."""
        return sorted(self._backlogged, key=self._order_key())

    def _candidates_after(self, first: str) -> Iterator[str]:
        """The rest of the serving order, sorted only if someone asks for it."""
        yield from (user for user in self._candidates() if user != first)

    def _order_key(self) -> Callable[[str], tuple]:
        """VIPs first; then least service ("tokens") or earliest turn; then longest waiting."""
        accounts = self.accounts
        tokens = self.fairness == "tokens"

        def key(user: str) -> tuple:
            acct = accounts[user]
            head = acct.queue[0]
            standing = acct.counter if tokens else acct.position
            return not acct.is_vip, standing, head.enqueued_at, head.seq

        return key

    def _pop(self, user: str, acct: UserAccount) -> Waiting:
        item = acct.queue.popleft()
        self._size -= 1
        item.charged = item.estimate + self.output_weight * self._expected_output(item, acct)
        self._charge(acct, item.charged)
        self._last_granted, acct.is_new = user, False
        acct.position = self._turn
        self._turn += 1
        if not acct.queue:
            self._leave_backlog(user)
        return item

    @staticmethod
    def _charge(acct: UserAccount, amount: float) -> None:
        """Add weighted service to a user's counter."""
        acct.counter += amount / acct.weight

    @staticmethod
    def _expected_output(item: Waiting, acct: UserAccount) -> float:
        """Output charged in advance, so a long generation counts while it runs (not after)."""
        expected = acct.mean_output or 0.0
        return expected if item.max_output is None else min(expected, item.max_output)

    def _join_backlog(self, user: str, acct: UserAccount) -> None:
        """A user becoming active is lifted so that idle time is not banked (VTC)."""
        acct.counter = max(acct.counter, self._floor(acct))
        acct.position = max(acct.position, self._turn - 1)
        self._backlogged[user] = None

    def _floor(self, acct: UserAccount) -> float:
        """Where a joining user starts: at least the least-served waiting user (VTC's lift).

        A new user starts no lower than the latest granted and completed users' counters
        (kept within the backlog's counters): otherwise a fresh id per request keeps the
        least counter where it is, and everyone served before waits forever.
        """
        if not self._backlogged:  # the counter as of now: charges of its last requests included
            return self.accounts[self._last_user].counter if self._last_user else 0.0
        counters = [self.accounts[u].counter for u in self._backlogged]
        latest = [self.accounts[u].counter for u in (self._last_granted, self._last_completed) if u]
        if not acct.is_new or not latest:
            return min(counters)
        return min(max(*latest, min(counters)), max(counters))

    def _leave_backlog(self, user: str) -> None:
        del self._backlogged[user]
        self._last_user = user
