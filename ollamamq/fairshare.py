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

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedList

from .placement import BackendView, Slots, pick_backend

__all__ = ["BackendView", "FairQueue", "Slots", "Waiting", "normalize_model", "pick_backend"]

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


@dataclass
class UserAccount:
    """Per-user scheduling state: the FIFO queue and, for "tokens", the service counter.

    Once the user has requests waiting, change `weight` and `is_vip` through
    FairQueue.configure(), which keeps the serving order in step.
    """

    queue: deque[Waiting] = field(default_factory=deque)
    counter: float = 0.0
    weight: float = 1.0
    is_vip: bool = False
    is_blocked: bool = False
    position: int = -1  # "requests": its latest grant's number, lifted to the latest on joining
    is_new: bool = True  # never granted: joins no lower than the latest users served
    mean_output: float | None = None  # moving average of the user's output tokens per request


Entry = tuple  # (not VIP, standing, head enqueued_at, head seq, user): the serving order
Line = tuple[str | None, str | None]  # (model, pinned backend) of a head: who can take it


class FairQueue:
    """Per-user FIFO queues and the order in which users are served.

    The order is kept as an index, not computed per grant: one sorted line of entries per
    kind of head request (its model and pinned backend), each backlogged user's entry in the
    line of its head, and the backlog's counters sorted for the join floor. A grant looks at
    the first entry of each line only, so it costs the same with 10 or 10,000 users waiting.
    Every change to a waiting user's head, counter or settings goes through _place().
    """

    def __init__(self, fairness: str = "tokens", output_weight: float = 2.0) -> None:
        if fairness not in FAIRNESS_MODES:
            raise ValueError(f"fairness must be one of {FAIRNESS_MODES}, not {fairness!r}")
        self.fairness = fairness
        self.output_weight = output_weight
        self.accounts: dict[str, UserAccount] = {}
        self._lines: dict[Line, SortedList] = {}
        self._placed: dict[str, tuple[Line, Entry, tuple[float, str]]] = {}  # the backlog
        self._counters = SortedList()  # (counter, user) of every backlogged user
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

    def configure(self, user: str, weight: float, vip: bool, blocked: bool) -> None:
        """Set a user's share weight, absolute priority and blocked flag."""
        acct = self.account(user)
        acct.weight, acct.is_vip, acct.is_blocked = weight, vip, blocked
        self._place(user, acct)

    def push(self, item: Waiting) -> None:
        """Queue `item` behind its user's other waiting requests."""
        acct = self.account(item.user)
        item.seq = next(self._arrivals)
        if not acct.queue:
            self._join_backlog(acct)
        acct.queue.append(item)
        self._size += 1
        if len(acct.queue) == 1:
            self._place(item.user, acct)

    def requeue(self, item: Waiting) -> None:
        """Put a granted item back at the head of its user's queue and refund its charge."""
        acct = self.account(item.user)
        self._charge(acct, -item.charged)
        acct.queue.appendleft(item)
        self._size += 1
        self._place(item.user, acct)

    def remove(self, item: Waiting) -> bool:
        """Take a waiting item out (its client left); False if it was not waiting."""
        acct = self.accounts.get(item.user)
        if acct is None or item not in acct.queue:
            return False
        was_head = acct.queue[0] is item
        acct.queue.remove(item)
        self._size -= 1
        if not acct.queue:
            self._leave_backlog(item.user)
        elif was_head:
            self._place(item.user, acct)
        return True

    def grant(self, backends: Sequence[BackendView] | Slots) -> tuple[Waiting, int] | None:
        """Pop the next request that some backend can take now, with that backend's index.

        The lines are tried in the order of their first entries: the first whose kind of
        request has a free backend gives the grant, so a full model never holds up another.
        The dispatcher passes one Slots for a round of grants and takes each slot in it.
        """
        slots = backends if isinstance(backends, Slots) else Slots(backends)
        if slots.free <= 0:
            return None
        for first, (model, only) in sorted((line[0], kind) for kind, line in self._lines.items()):
            index = slots.pick(model, self._turn, only)
            if index is not None:
                user = first[-1]
                return self._pop(user, self.accounts[user]), index
        return None

    def complete(self, user: str, charged: float, input_tokens: int, output_tokens: int) -> None:
        """Replace what the grant charged with the backend's own token counts."""
        acct = self.accounts.get(user)
        if acct is not None:
            self._charge(acct, input_tokens + self.output_weight * output_tokens - charged)
            self._last_completed = user
            previous = output_tokens if acct.mean_output is None else acct.mean_output
            acct.mean_output = previous + OUTPUT_SMOOTHING * (output_tokens - previous)
            self._place(user, acct)

    def progress(self, item: Waiting, output_tokens: int) -> None:
        """Charge a running request's output so far where it passes what its grant charged."""
        owed = item.estimate + self.output_weight * output_tokens - item.charged
        acct = self.accounts.get(item.user)
        if owed > 0 and acct is not None:
            item.charged += owed
            self._charge(acct, owed)
            self._place(item.user, acct)

    def service(self, user: str) -> float:
        """Weighted service counter of `user` (what "tokens" fairness equalizes)."""
        acct = self.accounts.get(user)
        return acct.counter if acct else 0.0

    def order(self) -> list[str]:
        """Backlogged users in the order they would be considered now."""
        return [entry[-1] for entry in heapq.merge(*self._lines.values())]

    def _place(self, user: str, acct: UserAccount) -> None:
        """Put a backlogged user's entry where its head, counter and settings now place it."""
        placed = self._placed.pop(user, None)
        if placed is not None:
            line, entry, counter = placed
            self._lines[line].remove(entry)
            if not self._lines[line]:
                del self._lines[line]
            self._counters.remove(counter)
        if not acct.queue:
            return
        head = acct.queue[0]
        standing = acct.counter if self.fairness == "tokens" else acct.position
        entry = (not acct.is_vip, standing, head.enqueued_at, head.seq, user)
        line = (head.model, head.backend)
        self._lines.setdefault(line, SortedList()).add(entry)
        self._counters.add((acct.counter, user))
        self._placed[user] = (line, entry, (acct.counter, user))

    def _pop(self, user: str, acct: UserAccount) -> Waiting:
        item = acct.queue.popleft()
        self._size -= 1
        item.charged = item.estimate + self.output_weight * self._expected_output(item, acct)
        self._charge(acct, item.charged)
        self._last_granted, acct.is_new = user, False
        acct.position = self._turn
        self._turn += 1
        if acct.queue:
            self._place(user, acct)
        else:
            self._leave_backlog(user)
        return item

    @staticmethod
    def _charge(acct: UserAccount, amount: float) -> None:
        """Add weighted service to a user's counter (the caller places the user again)."""
        acct.counter += amount / acct.weight

    @staticmethod
    def _expected_output(item: Waiting, acct: UserAccount) -> float:
        """Output charged in advance, so a long generation counts while it runs (not after)."""
        expected = acct.mean_output or 0.0
        return expected if item.max_output is None else min(expected, item.max_output)

    def _join_backlog(self, acct: UserAccount) -> None:
        """A user becoming active is lifted so that idle time is not banked (VTC)."""
        acct.counter = max(acct.counter, self._floor(acct))
        acct.position = max(acct.position, self._turn - 1)

    def _floor(self, acct: UserAccount) -> float:
        """Where a joining user starts: at least the least-served waiting user (VTC's lift).

        A new user starts no lower than the latest granted and completed users' counters
        (kept within the backlog's counters): otherwise a fresh id per request keeps the
        least counter where it is, and everyone served before waits forever.
        """
        if not self._counters:  # the counter as of now: charges of its last requests included
            return self.accounts[self._last_user].counter if self._last_user else 0.0
        least, most = self._counters[0][0], self._counters[-1][0]
        latest = [self.accounts[u].counter for u in (self._last_granted, self._last_completed) if u]
        if not acct.is_new or not latest:
            return least
        return min(max(*latest, least), most)

    def _leave_backlog(self, user: str) -> None:
        self._place(user, self.accounts[user])
        self._last_user = user
