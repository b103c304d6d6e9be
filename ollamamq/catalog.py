"""Model listings across every backend: the union of /api/tags, /api/ps and /v1/models."""

from __future__ import annotations

import logging

import gevent
import requests
from flask import current_app

from .backends import Backend, BackendPool
from .fairshare import normalize_model

log = logging.getLogger(__name__)

LISTS = {"/api/tags": "models", "/api/ps": "models", "/v1/models": "data"}


def _fetch(backend: Backend, path: str, timeout: tuple[float, float]) -> list[dict]:
    try:
        response = backend.session.get(backend.url + path, timeout=timeout)
        response.raise_for_status()
        return response.json()[LISTS[path]]
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        log.warning("listing %s on %s failed: %s", path, backend.name, exc)
        return []


def union(pool: BackendPool, path: str) -> list[dict]:
    """Entries of `path` from every healthy backend, each model once, in backend order."""
    timeout = (current_app.config["CONNECT_TIMEOUT"], current_app.config["TIMEOUT"])
    backends = [b for b in pool if b.is_up] or pool.backends
    fetches = [gevent.spawn(_fetch, b, path, timeout) for b in backends]
    gevent.joinall(fetches)
    seen: dict[str, dict] = {}
    for fetch in fetches:
        for entry in fetch.value or []:
            name = entry.get("id") or entry.get("model") or entry.get("name", "")
            seen.setdefault(normalize_model(name), entry)
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
