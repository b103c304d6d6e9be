"""Per-user standing orders (weight, VIP, blocked, budgets): from the config file and the DB."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from .budgets import LIMITS, Budgets
from .dispatcher import Dispatcher
from .extensions import db
from .models import UserSetting

log = logging.getLogger(__name__)

FIELDS = ("weight", "vip", "blocked", *LIMITS)


def as_flag(value: Any) -> bool:
    """A yes/no from JSON (true/false) or a form ("true", "on", "1"...)."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


class UserSettings:
    """Keeps the dispatcher's view of each user in step with the database."""

    def __init__(
        self, dispatcher: Dispatcher, budgets: Budgets, from_config: dict[str, dict[str, Any]]
    ) -> None:
        self.dispatcher = dispatcher
        self.budgets = budgets
        self.from_config = from_config
        self.announce: Callable[[], None] = lambda: None  # replicas: tell the others to load

    def load(self) -> None:
        """Apply the config file's users, then what operators changed at runtime (it wins)."""
        for user, values in self.from_config.items():
            self._apply(user, **{k: v for k, v in values.items() if k in FIELDS})
        for row in db.session.scalars(select(UserSetting)):
            self._apply(row.user, **{k: getattr(row, k) for k in FIELDS})

    def update(self, user: str, **changes: Any) -> UserSetting:
        """Change a user's weight, vip or blocked flag, now and after restarts."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown user settings: {', '.join(sorted(unknown))}")
        if "weight" in changes and not float(changes["weight"]) > 0:
            raise ValueError("weight must be a positive number")
        row = db.session.get(UserSetting, user) or self._current(user)
        for name, value in changes.items():
            setattr(row, name, _parsed(name, value))
        db.session.add(row)
        db.session.commit()
        self._apply(user, **{k: getattr(row, k) for k in FIELDS})
        self.announce()
        log.info("user %s: weight %s, vip %s, blocked %s", user, row.weight, row.vip, row.blocked)
        return row

    def _current(self, user: str) -> UserSetting:
        account = self.dispatcher.queue.account(user)
        return UserSetting(
            user=user, weight=account.weight, vip=account.is_vip, blocked=account.is_blocked
        )

    def _apply(
        self, user: str, weight: float = 1.0, vip: bool = False, blocked: bool = False, **limits
    ) -> None:
        self.dispatcher.configure_user(user, float(weight), bool(vip), bool(blocked))
        if any(v is not None for v in limits.values()):
            self.budgets.set_limits(user, **limits)


def _parsed(name: str, value: Any) -> Any:
    """A setting's value from JSON or a form; an empty budget means the default."""
    if name == "weight":
        return float(value)
    if name in LIMITS:
        if value in (None, ""):
            return None
        number = int(value) if name == "requests_per_minute" else float(value)
        if not number > 0:
            raise ValueError(f"{name} must be a positive number")
        return number
    return as_flag(value)
