"""What the admin shows: the dispatcher's snapshot and the download jobs as plain dicts.

The JSON API returns these dicts as they are and the pages render the same ones, so the
two never disagree.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from flask import current_app

from .backends import BackendStatus, RunningModel
from .budgets import budgets
from .config import Config
from .keys import KeyView
from .services import dispatcher, keys, networks, pulls
from .snapshot import Snapshot, UserView

MASK = "********"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY")
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+(@)")  # scheme://user:PASSWORD@host
NOTE = re.compile(r"^ +([A-Z][A-Z0-9_]*)\b[^#\n]*#\s*(.+)$", re.MULTILINE)
USER_COLUMNS = (
    "user",
    "waiting",
    "active",
    "served",
    "errors",
    "cancelled",
    "tokens_in",
    "tokens_out",
    "avg_wait_ms",
    "p95_wait_ms",
    "last_seen",
    "blocked",
)


def iso(moment: float | datetime | None) -> str | None:
    """ISO 8601 in UTC with "Z"; epoch seconds, or a naive UTC datetime as stored."""
    if not moment:
        return None
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds") + "Z"


# -- the JSON API's answers -------------------------------------------------------------------


def addresses_data() -> dict:
    """The client networks blocked by operators, and the allowed ones (none: everyone)."""
    rules = networks()
    return {"blocked": rules.listing(), "allowed": [str(n) for n in rules.allowed]}


def key_dict(view: KeyView) -> dict:
    """A key as the admin lists it: everything but the key itself, which nobody keeps."""
    return {
        "id": view.id,
        "prefix": view.prefix,
        "user": view.user,
        "role": view.role,
        "note": view.note,
        "status": view.status,
        "created_at": iso(view.created_at),
        "expires_at": iso(view.expires_at),
        "last_used_at": iso(view.last_used_at),
        "revoked_at": iso(view.revoked_at),
    }


def keys_data() -> dict:
    """Every API key, newest first, and whether keys are required."""
    return {"required": keys().enforced, "keys": [key_dict(v) for v in keys().views()]}


def overview_data() -> dict:
    """Version, uptime, totals, backends and the last hour's throughput; for a replica,
    also every live replica's summary (`cluster`)."""
    from . import __version__  # set by the package after it has imported the app

    snap = dispatcher().snapshot()
    cluster = dispatcher().cluster_state()
    return ({"cluster": cluster} if cluster else {}) | {
        "version": __version__,
        "uptime_s": round(time.time() - snap.started_at, 1),
        "fairness": snap.fairness,
        "totals": {
            "waiting": len(snap.waiting),
            "active": len(snap.active),
            "served": snap.served,
            "errors": snap.errors,
        },
        "backends": [backend_dict(b) for b in snap.backends],
        "throughput": [
            {"minute": iso(minute), "requests": requests, "tokens": tokens}
            for minute, requests, tokens in snap.throughput
        ],
    }


def backend_dict(status: BackendStatus) -> dict:
    """One backend's health and load."""
    latency = None if status.latency_ms is None else round(status.latency_ms, 1)
    return {
        "name": status.name,
        "url": status.url,
        "up": status.is_up,
        "latency_ms": latency,
        "active": status.active,
        "slots": status.slots,
        "models": list(status.models),
        "loaded": list(status.loaded),
        "running": [running_dict(m) for m in status.running],
        "error": status.error,
    }


def running_dict(model: RunningModel) -> dict:
    """A loaded model: memory it holds and when Ollama will unload it."""
    return {
        "model": model.model,
        "size_vram": model.size_vram,
        "size": model.size,
        "expires_at": model.expires_at,
        "expires_in_s": seconds_until(model.expires_at),
    }


def seconds_until(rfc3339: str | None) -> float | None:
    """Seconds from now to an RFC 3339 time; None if absent, unreadable or "never"."""
    try:
        moment = datetime.fromisoformat(rfc3339 or "")
    except ValueError:
        return None
    left = moment.timestamp() - time.time() if moment.year > 1 else None
    return None if left is None or left > 10 * 365 * 86400 else round(max(0.0, left), 1)


def users_data(sort: str = "user", descending: bool = False) -> dict:
    """Every user seen, sorted by one column (users never seen yet sort last)."""
    rows = [user_dict(u) for u in dispatcher().snapshot().users]
    key = sort if sort in USER_COLUMNS else "user"
    present = [r for r in rows if r[key] is not None]
    missing = [r for r in rows if r[key] is None]
    present.sort(key=lambda r: _sort_value(r[key]), reverse=descending)
    return {"users": present + missing}


def _sort_value(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def user_dict(view: UserView) -> dict:
    """One user's standing and history."""
    return {
        "user": view.user,
        "waiting": view.waiting,
        "active": view.active,
        "served": view.served,
        "errors": view.errors,
        "cancelled": view.cancelled,
        "tokens_in": view.tokens_in,
        "tokens_out": view.tokens_out,
        "avg_wait_ms": round(view.avg_wait_ms, 1),
        "p95_wait_ms": round(view.p95_wait_ms, 1),
        "last_seen": iso(view.last_seen),
        "blocked": view.blocked,
        "vip": view.vip,
        "weight": view.weight,
        "service": round(view.service, 3),
        "budget": budget_dict(view.user),
    }


def budget_dict(user: str) -> dict:
    """The user's limits, what is used of them this day and month, and the share in percent."""
    ledger = budgets()
    limits, used = ledger.limits_of(user), ledger.usage(user)
    shown = {"requests_per_minute": limits.requests_per_minute}
    for period in ("day", "month"):
        limit = getattr(limits, f"tokens_per_{period}")
        shown[f"tokens_per_{period}"] = limit
        shown[f"used_{period}"] = round(used[period])
        shown[f"percent_{period}"] = min(100.0, 100 * used[period] / limit) if limit else None
    return shown


def queue_data(snap: Snapshot | None = None) -> dict:
    """Waiting requests in grant order (position: place in its user's FIFO) and active ones."""
    snap = snap or dispatcher().snapshot()
    places: dict[str, int] = {}
    waiting = []
    for t in snap.waiting:
        places[t.user] = places.get(t.user, 0) + 1
        row = {"id": t.id, "user": t.user, "model": t.model, "path": t.path}
        waiting.append(row | {"seconds": round(t.seconds, 1), "position": places[t.user]})
    active = [
        {"id": t.id, "user": t.user, "model": t.model, "path": t.path, "backend": t.backend}
        | {"seconds": round(t.seconds, 1), "tokens": t.records}
        for t in snap.active
    ]
    return {"waiting": waiting, "active": active}


def downloads_data() -> dict:
    """Every job (downloading, pending in order, recent history) and the schedule."""
    service = pulls()
    return {
        "jobs": [job.as_dict() for job in service.jobs()],
        "counts": service.counts(),
        "next_run": iso(service.next_run()),
        "processing": service.is_running,
        "window_open": service.is_window_open(),
    }


def settings_data() -> dict:
    """The effective configuration, secrets masked."""
    names = [name for name in vars(Config) if name.isupper()]
    return {"settings": {name: masked(name, current_app.config.get(name)) for name in names}}


def masked(name: str, value: Any) -> Any:
    """A setting fit to show: secrets hidden, URL passwords hidden, JSON-ready."""
    if SECRET_NAME.search(name) and value:
        return MASK
    if isinstance(value, str):
        return URL_PASSWORD.sub(rf"\g<1>{MASK}\g<2>", value)
    if isinstance(value, list | tuple):
        return [masked(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): masked(str(k), v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


# -- what only the pages need -------------------------------------------------------------

JOB_ACTIONS = {  # what an operator may do to a download job, by its status
    "pending": ("process", "cancel", "remove"),
    "downloading": ("cancel",),
    "failed": ("retry", "remove"),
    "cancelled": ("retry", "remove"),
    "completed": ("remove",),
}
BUTTON_STYLES = {"process": "primary", "cancel": "danger"}


def setting_notes() -> dict[str, str]:
    """Each setting's one-line comment in config.py, to explain it on the settings page."""
    return dict(NOTE.findall(inspect.getsource(Config)))


def by_user(waiting: Iterable[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """Waiting requests grouped per user, users in the order they will be served."""
    groups: dict[str, list[Mapping]] = {}
    for row in waiting:
        groups.setdefault(row["user"], []).append(row)
    return list(groups.items())


def bars(points: list[dict], key: str, width: int = 600, height: int = 120) -> dict:
    """Bar geometry for an inline SVG chart of `key` per minute, scaled to the peak."""
    peak = max((p[key] for p in points), default=0)
    step = width / max(1, len(points))
    shapes = []
    for n, point in enumerate(points):
        tall = height * point[key] / peak if peak else 0
        shapes.append(
            {
                "x": round(n * step + 1, 1),
                "y": round(height - tall, 1),
                "w": round(max(1.0, step - 2), 1),
                "h": round(tall, 1),
                "title": f"{point['minute'][11:16]} UTC: {point[key]}",
            }
        )
    return {"peak": peak, "total": sum(p[key] for p in points), "bars": shapes}
