"""Model listings across every backend: the union of /api/tags, /api/ps and /v1/models."""

from __future__ import annotations

import logging

import gevent
import requests
from flask import current_app
from werkzeug.exceptions import BadGateway

from .backends import Backend, BackendPool
from .fairshare import normalize_model

log = logging.getLogger(__name__)

LISTS = {"/api/tags": "models", "/api/ps": "models", "/v1/models": "data"}


class NoBackendAnswered(BadGateway):
    """A listing no backend answered: an empty list would say no model exists."""

    def __init__(self, path: str, backends: list[Backend]) -> None:
        names = ", ".join(b.name for b in backends)
        super().__init__(f"no backend answered {path} (tried {names})")


def _fetch(backend: Backend, path: str, timeout: tuple[float, float]) -> list[dict] | None:
    """The backend's entries, or None when it did not answer with a listing."""
    try:
        response = backend.session.get(backend.url + path, timeout=timeout)
        response.raise_for_status()
        entries = response.json()[LISTS[path]]
        return [e for e in entries or [] if isinstance(e, dict)]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        log.warning("listing %s on %s failed: %s", path, backend.name, exc)
        return None


def union(pool: BackendPool, path: str) -> list[dict]:
    """Entries of `path` from every healthy backend, each model once, in backend order.

    Raises NoBackendAnswered when none answered; with some answering, their union.
    """
    timeout = (current_app.config["CONNECT_TIMEOUT"], current_app.config["TIMEOUT"])
    backends = pool.candidates()
    fetches = [gevent.spawn(_fetch, b, path, timeout) for b in backends]
    gevent.joinall(fetches)
    answered = [f.value for f in fetches if f.value is not None]
    if not answered:
        raise NoBackendAnswered(path, backends)
    missing = [b.name for b in pool if b not in backends] + [
        b.name for b, f in zip(backends, fetches, strict=True) if f.value is None
    ]
    if missing:
        log.warning("%s lists only what answered; missing: %s", path, ", ".join(missing))
    seen: dict[str, dict] = {}
    for entries in answered:
        for entry in entries:
            name = entry.get("id") or entry.get("model") or entry.get("name") or ""
            seen.setdefault(normalize_model(str(name)), entry)
    return list(seen.values())


def queued_entry(model: str, queued_at: str) -> dict:
    """A /api/tags entry for a model still in the download queue (ohhhllama's marking)."""
    return {
        "name": model,
        "model": model,
        "modified_at": queued_at,
        "size": 0,
        "digest": "",
        "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""},
        "status": "queued",
    }
