"""API keys: created and revoked in the database, looked up from memory on every request."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import Flask
from sqlalchemy import exists, select, update

from .extensions import db
from .models import ROLES, ApiKey, utcnow
from .supervisor import Supervisor

log = logging.getLogger(__name__)

RING_KEY = "ollamamq.keys"  # where the app keeps its KeyRing
KEY_PREFIX = "omq_"
SHOWN_PREFIX = 10  # characters of a key kept to tell keys apart: "omq_" and 6 more
RELOAD_S = 1.0  # a key revoked by another process (the CLI) is refused within this
LAST_USED_WRITE_S = 60.0  # last-used times reach the database at most this often per key


def new_key() -> str:
    """A fresh key: the prefix and 256 bits from the system's CSPRNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """What the database keeps of a key.

    One fast SHA-256, not scrypt: a key is 256 random bits, so there is no list of likely
    keys to try and a stolen table is useless. A password is short and guessable, so it
    needs a slow, salted hash; spending that on every request here would buy nothing.
    """
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A live key as the hot path sees it."""

    id: int
    user: str
    role: str
    expires: float | None  # epoch seconds


@dataclass(frozen=True)
class KeyView:
    """A key as the CLI and the admin list it (never the key itself)."""

    id: int
    prefix: str
    user: str
    role: str
    note: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= utcnow():
            return "expired"
        return "active"


def _epoch(when: datetime | None) -> float | None:
    return when.replace(tzinfo=UTC).timestamp() if when else None


class KeyRing:
    """Owns the in-memory table of live keys and when each was last used.

    Request greenlets only call find(); the reload greenlet replaces the table whole, so a
    lookup never sees it half-built. Nothing here yields between reading and writing.
    """

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.enforced = False  # a key has ever been created: every request needs one
        self._live: dict[str, KeyEntry] = {}
        self._used: dict[int, float] = {}  # key id -> last use, not yet written
        self._written: dict[int, float] = {}  # key id -> when its last use was written
        self.greenlets = Supervisor("keys")
        self.announce: Callable[[], None] = lambda: None  # replicas: tell the others to reload

    def find(self, key: str) -> KeyEntry | None:
        """The live, unexpired key, or None; notes the use for the next write."""
        entry = self._live.get(digest(key))
        now = time.time()
        if entry is None or (entry.expires is not None and entry.expires <= now):
            return None
        self._used[entry.id] = now
        return entry

    def reload(self) -> None:
        """Read the live keys again (cheap: one query for the whole table)."""
        with self.app.app_context():
            rows = db.session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
            self.enforced = bool(rows) or db.session.scalar(select(exists().where(ApiKey.id > 0)))
            self._live = {
                r.digest: KeyEntry(r.id, r.user, r.role, _epoch(r.expires_at)) for r in rows
            }
            db.session.remove()

    def flush_last_used(self, now: float | None = None) -> None:
        """Write last-used times, each key at most once every LAST_USED_WRITE_S."""
        now = time.time() if now is None else now
        due = {
            key_id: used
            for key_id, used in self._used.items()
            if now - self._written.get(key_id, 0.0) >= LAST_USED_WRITE_S
        }
        if not due:
            return
        with self.app.app_context():
            for key_id, used in due.items():
                when = datetime.fromtimestamp(used, UTC).replace(tzinfo=None)
                db.session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
                )
            db.session.commit()
            db.session.remove()
        for key_id in due:
            self._written[key_id] = now
            self._used.pop(key_id, None)

    def start(self) -> None:
        """Load the keys, then reload them every RELOAD_S in one supervised greenlet."""
        self.reload()
        self.greenlets.every("reload", RELOAD_S, self._refresh)

    def stop(self) -> None:
        """Stop reloading; write what is left of the last-used times."""
        self.greenlets.stop()
        self.flush_last_used(now=float("inf"))

    def health_problem(self) -> str | None:
        return self.greenlets.health_problem()

    def _refresh(self) -> None:
        self.reload()
        self.flush_last_used()

    # What operators do, from the CLI or the admin (inside an app context).

    def create(
        self, user: str, role: str = "user", expires_days: float | None = None, note: str = ""
    ) -> tuple[str, KeyView]:
        """A new key for `user`: the key (shown once, never stored) and its listing."""
        user = user.strip()
        if not user:
            raise ValueError("a key needs a user")
        if ":" in user:  # KEYUSER:ID is a gateway's end user; no direct user may look like one
            raise ValueError("a key's user may not contain ':'")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if expires_days is not None and not float(expires_days) > 0:
            raise ValueError("expires_days must be a positive number")
        key = new_key()
        expires = utcnow() + timedelta(days=float(expires_days)) if expires_days else None
        row = ApiKey(
            digest=digest(key),
            prefix=key[:SHOWN_PREFIX],
            user=user[:200],
            role=role,
            note=(note or "")[:200],
            expires_at=expires,
        )
        db.session.add(row)
        db.session.commit()
        self.reload()
        self.announce()
        log.info("API key %d (%s...) created for %s, role %s", row.id, row.prefix, user, role)
        return key, _view(row)

    def revoke(self, key_id: int) -> KeyView | None:
        """Revoke a key at once, here and on replicas; other processes notice within RELOAD_S."""
        row = db.session.get(ApiKey, key_id)
        if row is None:
            return None
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            db.session.commit()
            log.info("API key %d (%s...) of %s revoked", row.id, row.prefix, row.user)
        self.reload()
        self.announce()
        return _view(row)

    def views(self) -> list[KeyView]:
        """Every key, newest first."""
        return [_view(r) for r in db.session.scalars(select(ApiKey).order_by(ApiKey.id.desc()))]


def _view(row: ApiKey) -> KeyView:
    return KeyView(
        row.id,
        row.prefix,
        row.user,
        row.role,
        row.note,
        row.created_at,
        row.expires_at,
        row.last_used_at,
        row.revoked_at,
    )
