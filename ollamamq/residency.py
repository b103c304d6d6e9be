"""Operators load a model into a backend's memory or unload it, through the fair queue.

Ollama documents both as a generate with no prompt: a load keeps the model resident,
`keep_alive: 0` unloads it. Each call takes a slot on that backend like any request, so
it waits its turn and never exceeds the backend's slots.
"""

from __future__ import annotations

import logging

import requests

from .backends import Backend
from .dispatcher import Dispatcher
from .fairshare import normalize_model

log = logging.getLogger(__name__)

OPERATOR = "admin"  # the user these calls queue as


class ResidencyError(Exception):
    """A load or unload could not be done; `status` is the HTTP answer to give."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def find_backend(dispatcher: Dispatcher, name: str) -> Backend:
    """The backend called `name` (404 if none)."""
    backend = next((b for b in dispatcher.pool if b.name == name), None)
    if backend is None:
        raise ResidencyError(f"no backend {name!r}", 404)
    return backend


def change(
    dispatcher: Dispatcher, name: str, model: str, load: bool, timeout: tuple[float, float]
) -> dict:
    """Load or unload `model` on backend `name` once a slot there is free; Ollama's answer."""
    backend = find_backend(dispatcher, name)
    model = normalize_model(model)
    if load and not backend.has_model(model):
        raise ResidencyError(f"backend {name} has no model {model!r}", 404)
    body: dict = {"model": model, "stream": False}
    if not load:
        body["keep_alive"] = 0
    ticket = dispatcher.submit(OPERATOR, model, "/api/generate", backend=backend.name)
    if not ticket.wait():
        raise ResidencyError(f"the {'load' if load else 'unload'} was cancelled", 410)
    try:
        response = backend.session.post(backend.url + "/api/generate", json=body, timeout=timeout)
        answer = response.json()
        ticket.failed = response.status_code >= 400
    except (requests.RequestException, ValueError) as exc:
        ticket.failed = True
        raise ResidencyError(f"backend {name} failed: {exc}", 502) from exc
    finally:
        dispatcher.release(ticket)
        backend.check(min(timeout))  # what is loaded now, with sizes and expiry
        dispatcher.wake()
    if ticket.failed:
        raise ResidencyError(str(answer.get("error") or answer), response.status_code)
    log.info("%s %s on backend %s", "loaded" if load else "unloaded", model, name)
    return answer
