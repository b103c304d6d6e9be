"""What the dispatcher shows of itself: frozen copies for the health check and the admin."""

from __future__ import annotations

from dataclasses import dataclass

from .backends import BackendStatus


@dataclass(frozen=True)
class TicketView:
    """A waiting or active request, for display."""

    id: int
    user: str
    model: str | None
    path: str
    backend: str | None
    seconds: float  # waiting so far, or streaming so far
    records: int  # streamed records relayed so far (about one per token)


@dataclass(frozen=True)
class UserView:
    """One user's standing and history, for display."""

    user: str
    waiting: int
    active: int
    served: int
    errors: int
    cancelled: int
    tokens_in: int
    tokens_out: int
    avg_wait_ms: float
    p95_wait_ms: float
    last_seen: float  # seconds since the epoch
    blocked: bool
    vip: bool
    weight: float
    service: float  # the fairness counter: weighted tokens (or grants) received


@dataclass(frozen=True)
class Snapshot:
    """Everything the health check and admin show, copied at one instant."""

    backends: tuple[BackendStatus, ...]
    waiting: tuple[TicketView, ...]  # in the order they would be granted, user by user
    active: tuple[TicketView, ...]
    users: tuple[UserView, ...]
    served: int
    errors: int
    throughput: tuple[tuple[int, int, int], ...]  # (minute start, requests, tokens), last hour
    started_at: float  # seconds since the epoch
    fairness: str
