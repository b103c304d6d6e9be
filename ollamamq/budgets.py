"""Budgets per user: requests per minute, and tokens per day and per month.

Tokens are weighted as fairness weighs them (input + OUTPUT_WEIGHT x output) and counted
from what each finished request was charged: the backend's own figures, else what was
streamed. Periods are UTC days and months. The counts live in memory and reach the
database every few seconds and at stop, so a restart does not reset them. Replicas count
in Redis instead (one hash per period), so a budget spent through one is spent on all.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

import redis
from flask import Flask, current_app
from limits import RateLimitItemPerMinute
from sqlalchemy import select
from werkzeug.exceptions import TooManyRequests

from .accesslog import Finished
from .extensions import db, limiter
from .models import TokenUsage
from .supervisor import Supervisor

log = logging.getLogger(__name__)

BUDGETS_KEY = "ollamamq.budgets"
WRITE_S = 5.0  # how often counted tokens reach the database
DAY_S = 86400  # UTC days have no leap seconds in epoch time
LIMITS = ("requests_per_minute", "tokens_per_day", "tokens_per_month")
SHARED_TTL_S = 40 * DAY_S  # a month's shared count outlives its month by some days


@dataclass(frozen=True)
class Limits:
    """One user's budget; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_day: float | None = None
    tokens_per_month: float | None = None


class OverBudget(TooManyRequests):
    """A user past one of their budgets: 429 until the period resets."""

    def __init__(self, what: str, limit: float, used: float, reset: float, now: float) -> None:
        super().__init__(
            f"{what} budget spent: {used:.0f} of {limit:.0f}; it resets at "
            f"{datetime.fromtimestamp(reset, UTC).isoformat(timespec='seconds')}"
        )
        self.retry_after = max(1, int(reset - now) + 1)
        self.rate_headers = {
            "X-RateLimit-Limit": f"{limit:.0f}",
            "X-RateLimit-Remaining": str(max(0, int(limit - used))),
            "X-RateLimit-Reset": str(int(reset)),
        }


def periods(now: float) -> Mapping[str, tuple[str, float]]:
    """The current day and month of `now`: their key and when they end (epoch seconds)."""
    return _periods_of_day(int(now // DAY_S))  # every finished request asks: once a day


@functools.lru_cache(maxsize=4)
def _periods_of_day(day_number: int) -> Mapping[str, tuple[str, float]]:
    day = datetime.fromtimestamp(day_number * DAY_S, UTC)
    month = day.replace(day=1)
    next_month = month.replace(year=month.year + month.month // 12, month=month.month % 12 + 1)
    return MappingProxyType(
        {
            "day": (day.strftime("%Y-%m-%d"), day.timestamp() + DAY_S),
            "month": (month.strftime("%Y-%m"), next_month.timestamp()),
        }
    )


class Budgets:
    """Owns each user's budget and the tokens counted against it.

    Request greenlets call check() and spend(); the writer greenlet only copies the counts
    out. Nothing yields between reading and writing the counts.
    """

    def __init__(
        self,
        app: Flask,
        defaults: Limits,
        output_weight: float,
        shared: redis.Redis | None = None,
    ) -> None:
        self.app = app
        self.shared = shared  # replicas: the counts of record are in Redis
        self.defaults = defaults
        self.output_weight = output_weight
        self.limits: dict[str, Limits] = {}  # users with limits of their own
        self.used: dict[tuple[str, str], float] = {}  # (user, period key) -> weighted tokens
        self._dirty: set[tuple[str, str]] = set()
        self._unshared: dict[tuple[str, str], float] = {}  # counted here, not yet in Redis
        self.greenlets = Supervisor("budgets")
        self.clock = time.time  # tests freeze it

    def limits_of(self, user: str) -> Limits:
        return self.limits.get(user, self.defaults)

    def set_limits(self, user: str, **given: float | None) -> None:
        """A user's own limits; a None field falls back to the default."""
        own = {k: v for k, v in given.items() if v is not None}
        self.limits[user] = Limits(**{k: own.get(k, getattr(self.defaults, k)) for k in LIMITS})

    def check(self, user: str) -> None:
        """Raise OverBudget if `user` may not start another request now."""
        limits = self.limits_of(user)
        if limits.tokens_per_day is not None or limits.tokens_per_month is not None:
            self._check_tokens(user, limits)
        if limits.requests_per_minute is not None:
            self._count_request(user, limits.requests_per_minute)

    def _check_tokens(self, user: str, limits: Limits) -> None:
        now = self.clock()  # only with a token budget: the hot path reads no calendar
        current = periods(now)
        if self.shared is not None:
            self._read_shared(user, [key for key, _ in current.values()])
        for name, (key, ends) in current.items():
            limit = getattr(limits, f"tokens_per_{name}")
            used = self.used.get((user, key), 0.0)
            if limit is not None and used >= limit:
                raise OverBudget(f"tokens per {name}", limit, used, ends, now)

    def _count_request(self, user: str, per_minute: int) -> None:
        """Flask-Limiter's storage (memory or Redis) counts requests per minute, per user."""
        item = RateLimitItemPerMinute(per_minute)
        if limiter.limiter.hit(item, "budget-rpm", user):
            return
        reset, left = limiter.limiter.get_window_stats(item, "budget-rpm", user)
        raise OverBudget("requests per minute", per_minute, per_minute - left, reset, time.time())

    def spend(self, record: Finished) -> None:
        """Count a finished request's tokens (an access-log observer)."""
        cost = record.tokens_in + self.output_weight * record.tokens_out
        if not cost:
            return
        for key, _ in periods(self.clock()).values():
            counted = (record.user, key)
            self.used[counted] = self.used.get(counted, 0.0) + cost
            self._dirty.add(counted)
            if self.shared is not None:
                self._unshared[counted] = self._unshared.get(counted, 0.0) + cost
        if self.shared is not None and self._has_token_budget(record.user):
            self.share()  # at once: the other replicas must see a budget spent

    def _has_token_budget(self, user: str) -> bool:
        limits = self.limits_of(user)
        return limits.tokens_per_day is not None or limits.tokens_per_month is not None

    def _read_shared(self, user: str, keys: list[str]) -> None:
        """This user's counts as all replicas spent them; ours alone if Redis cannot say."""
        pipe = self.shared.pipeline(transaction=False)
        for key in keys:
            pipe.hget(_shared_key(key), user)
        try:
            values = pipe.execute()
        except redis.RedisError as exc:
            log.warning("token budgets: Redis unreachable, counting here only: %s", exc)
            return
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                self.used[(user, key)] = float(value)

    def share(self) -> None:
        """Add what this replica counted since last time to the counts in Redis, and take
        their totals; a count Redis lost (a restart) starts again from ours."""
        pending, self._unshared = self._unshared, {}
        if not pending:
            return
        pipe = self.shared.pipeline(transaction=False)
        for (user, key), cost in pending.items():
            pipe.hsetnx(_shared_key(key), user, self.used[(user, key)] - cost)
            pipe.hincrbyfloat(_shared_key(key), user, cost)
            pipe.expire(_shared_key(key), SHARED_TTL_S)
        try:
            totals = pipe.execute()[1::3]
        except redis.RedisError as exc:
            log.warning("token budgets: Redis unreachable, counting here for now: %s", exc)
            for counted, cost in pending.items():
                self._unshared[counted] = self._unshared.get(counted, 0.0) + cost
            return
        for counted, total in zip(pending, totals, strict=True):
            self.used[counted] = float(total)

    def usage(self, user: str) -> dict[str, float]:
        """Tokens counted this day and month."""
        current = periods(self.clock()).items()
        return {name: self.used.get((user, key), 0.0) for name, (key, _) in current}

    def load(self) -> None:
        """Read this day's and month's counts (inside an app context)."""
        keys = [key for key, _ in periods(self.clock()).values()]
        for row in db.session.scalars(select(TokenUsage).where(TokenUsage.period.in_(keys))):
            self.used[(row.user, row.period)] = row.tokens

    def write(self) -> None:
        """Store the counts changed since the last write (the shared totals, for replicas)."""
        if self.shared is not None:
            self.share()
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return
        with self.app.app_context():
            for user, period in dirty:
                row = db.session.get(TokenUsage, (user, period)) or TokenUsage(
                    user=user, period=period
                )
                row.tokens = self.used[(user, period)]
                db.session.add(row)
            db.session.commit()
            db.session.remove()

    def start(self) -> None:
        """Write the counts every WRITE_S in one supervised greenlet."""
        self.greenlets.every("writer", WRITE_S, self.write)

    def stop(self) -> None:
        self.greenlets.stop()
        self.write()

    def health_problem(self) -> str | None:
        return self.greenlets.health_problem()


def _shared_key(period: str) -> str:
    return f"ollamamq:tokens:{period}"


def init_budgets(app: Flask, shared: redis.Redis | None = None) -> Budgets:
    config = app.config
    defaults = Limits(
        config["DEFAULT_REQUESTS_PER_MINUTE"],
        config["DEFAULT_TOKENS_PER_DAY"],
        config["DEFAULT_TOKENS_PER_MONTH"],
    )
    budgets = app.extensions[BUDGETS_KEY] = Budgets(app, defaults, config["OUTPUT_WEIGHT"], shared)
    return budgets


def budgets() -> Budgets:
    return current_app.extensions[BUDGETS_KEY]
