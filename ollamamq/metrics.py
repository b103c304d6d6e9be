"""Counters of served work: per user and per minute. Plain data, owned by the dispatcher."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WAIT_SAMPLES = 256  # recent waits kept per user for the average and p95
MINUTES_KEPT = 60  # throughput history


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass(slots=True)  # one per user ever seen: thousands
class UserStats:
    """What one user has been served."""

    served: int = 0
    errors: int = 0
    cancelled: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    last_seen: float = 0.0
    waits_ms: deque[float] | None = None  # from the first grant: a kilobyte per user

    def add_wait(self, wait_ms: float) -> None:
        """Keep one more wait among the recent ones."""
        if self.waits_ms is None:
            self.waits_ms = deque(maxlen=WAIT_SAMPLES)
        self.waits_ms.append(wait_ms)

    def avg_wait_ms(self) -> float:
        """Mean of the recent waits."""
        return sum(self.waits_ms) / len(self.waits_ms) if self.waits_ms else 0.0

    def p95_wait_ms(self) -> float:
        """95th percentile of the recent waits."""
        return percentile(list(self.waits_ms or ()), 0.95)


@dataclass
class Throughput:
    """Requests and tokens per wall-clock minute over the last hour."""

    minutes: deque[list[int]] = field(default_factory=lambda: deque(maxlen=MINUTES_KEPT))

    def add(self, now: float, requests: int, tokens: int) -> None:
        """Count work finished at `now` (seconds since the epoch)."""
        minute = int(now // 60)
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append([minute, 0, 0])
        self.minutes[-1][1] += requests
        self.minutes[-1][2] += tokens

    def series(self, now: float) -> list[tuple[int, int, int]]:
        """(minute start, requests, tokens) for each of the last 60 minutes, oldest first."""
        counts = {m: (r, t) for m, r, t in self.minutes}
        last = int(now // 60)
        return [(m * 60, *counts.get(m, (0, 0))) for m in range(last - MINUTES_KEPT + 1, last + 1)]
