"""Persistent state: the download queue, user settings and API keys."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Index, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db

PENDING, DOWNLOADING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "downloading",
    "completed",
    "failed",
    "cancelled",
)
ACTIVE_STATUSES = (PENDING, DOWNLOADING)
STATUSES = (PENDING, DOWNLOADING, COMPLETED, FAILED, CANCELLED)


def utcnow() -> datetime:
    """Now, in UTC, without tzinfo (how every timestamp is stored)."""
    return datetime.now(UTC).replace(tzinfo=None)


class PullJob(db.Model):
    """One requested model download."""

    __tablename__ = "pull_jobs"
    __table_args__ = (  # at most one pending or downloading job per model: deduplication
        Index(
            "uq_pull_jobs_active_model",
            "model",
            unique=True,
            sqlite_where=text("status IN ('pending', 'downloading')"),
            postgresql_where=text("status IN ('pending', 'downloading')"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str] = mapped_column(String(300), index=True)  # normalized name
    status: Mapped[str] = mapped_column(String(20), index=True, default=PENDING)
    requested_by: Mapped[str] = mapped_column(String(100))  # client address
    user: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    completed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # models pass 2 GiB
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)

    @property
    def percent(self) -> float:
        """Bytes downloaded, in percent (100 when completed)."""
        if self.status == COMPLETED:
            return 100.0
        return 100.0 * self.completed_bytes / self.total_bytes if self.total_bytes else 0.0


class UserSetting(db.Model):
    """An operator's standing orders for one user: share weight, VIP, blocked."""

    __tablename__ = "user_settings"

    user: Mapped[str] = mapped_column(String(200), primary_key=True)
    weight: Mapped[float] = mapped_column(default=1.0)
    vip: Mapped[bool] = mapped_column(default=False)
    blocked: Mapped[bool] = mapped_column(default=False)
    requests_per_minute: Mapped[int | None]  # None: the default budget
    tokens_per_day: Mapped[float | None]
    tokens_per_month: Mapped[float | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


ROLES = ("user", "gateway", "admin")


class ApiKey(db.Model):
    """A per-user API key: only its hash is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the key, hex
    prefix: Mapped[str] = mapped_column(
        String(16)
    )  # "omq_" and a few characters, to tell keys apart
    user: Mapped[str] = mapped_column(String(200), index=True)
    role: Mapped[str] = mapped_column(String(10), default="user")
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEvent(db.Model):
    """One admin action or key event: who, what, when, from where. Never a secret."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # "admin session", "key 3 (ana)", "cli"
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(300), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    address: Mapped[str] = mapped_column(String(100), default="")
    status: Mapped[int] = mapped_column(default=200)


class TokenUsage(db.Model):
    """Weighted tokens a user spent in one UTC day ("2026-12-02") or month ("2026-12")."""

    __tablename__ = "token_usage"

    user: Mapped[str] = mapped_column(String(200), primary_key=True)
    period: Mapped[str] = mapped_column(String(10), primary_key=True)
    tokens: Mapped[float] = mapped_column(default=0.0)


class BlockedNetwork(db.Model):
    """A client address or network an operator shut out (ollamaMQ blocks IPs as well as users)."""

    __tablename__ = "blocked_networks"

    network: Mapped[str] = mapped_column(String(50), primary_key=True)  # "10.0.0.7/32"
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WindowOpening(db.Model):
    """When the download window last opened, so a restart can tell a missed one."""

    __tablename__ = "window_openings"

    id: Mapped[int] = mapped_column(primary_key=True)  # one row: 1
    opened_at: Mapped[datetime]  # UTC
