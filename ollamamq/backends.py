"""Ollama backends: one HTTP session each, health, and which models live where."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import requests
from requests.adapters import HTTPAdapter

from .fairshare import normalize_model
from .http1 import POOL_CONNECTIONS, ConnectionPool
from .placement import BackendView
from .supervisor import Supervisor

log = logging.getLogger(__name__)

HEALTH_LOOP = "health loop"


def parse_backend(spec: str, default_slots: int) -> tuple[str, int]:
    """Split "http://host:11434#4" into the URL and its number of slots."""
    url, _, slots = spec.partition("#")
    return url.rstrip("/"), int(slots) if slots else default_slots


def make_session() -> requests.Session:
    """A session that adds no headers of its own: the client's headers are what we send."""
    session = requests.Session()
    session.headers.clear()
    session.trust_env = False  # never route loopback backends through an environment proxy
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_CONNECTIONS, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class BackendStatus:
    """A backend as the health endpoint and the admin show it."""

    name: str
    url: str
    is_up: bool
    latency_ms: float | None
    active: int
    slots: int
    models: tuple[str, ...]
    loaded: tuple[str, ...]
    error: str | None
    running: tuple[RunningModel, ...] = ()  # the loaded models' details from /api/ps


@dataclass(frozen=True)
class RunningModel:
    """A model in a backend's memory, as /api/ps describes it."""

    model: str
    size_vram: int
    size: int
    expires_at: str | None  # RFC 3339, as Ollama sends it


class Backend:
    """One Ollama server. `active` is written only by the dispatcher; health by the pool."""

    def __init__(self, url: str, slots: int) -> None:
        self.url = url
        self.name = url.split("://", 1)[-1]
        self.slots = slots
        self.active = 0
        self.session = make_session()  # health checks, listings and pulls
        self.pool = ConnectionPool(url)  # the relay's
        self.is_up = True  # optimistic until a check or a request says otherwise
        self.rest_until = 0.0  # monotonic time before which a busy backend gets no new work
        self.latency_ms: float | None = None
        self.models: frozenset[str] | None = None
        self.loaded: frozenset[str] = frozenset()
        self.running: tuple[RunningModel, ...] = ()
        self.error: str | None = None

    def has_model(self, model: str) -> bool:
        """Whether the model is installed here, or the list is not known yet."""
        return self.models is None or normalize_model(model) in self.models

    def view(self, now: float) -> BackendView:
        """The policy's picture of this backend at monotonic time `now`."""
        free = 0 if now < self.rest_until else self.slots - self.active
        return BackendView(self.name, free, self.active, self.is_up, self.models, self.loaded)

    def status(self) -> BackendStatus:
        """A frozen copy for display."""
        return BackendStatus(
            self.name,
            self.url,
            self.is_up,
            self.latency_ms,
            self.active,
            self.slots,
            tuple(sorted(self.models or ())),
            tuple(sorted(self.loaded)),
            self.error,
            self.running,
        )

    def mark_down(self, error: str) -> None:
        """Record a failure seen by a request; the next health check may bring it back."""
        if self.is_up:
            log.warning("backend %s is down: %s", self.name, error)
        self.is_up, self.error = False, error

    def check(self, timeout: float) -> None:
        """Refresh health, latency and the installed and loaded models."""
        try:
            started = time.perf_counter()
            self.models = frozenset(self._installed(timeout))
            self.latency_ms = (time.perf_counter() - started) * 1000
            self.loaded = frozenset(self._loaded(timeout))
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            self.mark_down(str(exc))
            return
        if not self.is_up:
            log.info("backend %s is up again", self.name)
        self.is_up, self.error = True, None

    def refresh_models(self, timeout: float) -> None:
        """Re-read the installed models (a miss may be a model added behind our back)."""
        try:
            self.models = frozenset(self._installed(timeout))
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            log.warning("refreshing the models of %s failed: %s", self.name, exc)

    def _installed(self, timeout: float) -> list[str]:
        """Models from /api/tags, or /v1/models for a backend that speaks only OpenAI."""
        response = self.session.get(self.url + "/api/tags", timeout=timeout)
        if response.status_code == 404:
            listing = self._get_json("/v1/models", timeout)["data"]
            return [normalize_model(m["id"]) for m in listing]
        response.raise_for_status()
        return _model_names(response.json())

    def _loaded(self, timeout: float) -> list[str]:
        response = self.session.get(self.url + "/api/ps", timeout=timeout)
        if response.status_code == 404:
            self.running = ()
            return []
        response.raise_for_status()
        listing = response.json()
        self.running = tuple(_running(m) for m in listing.get("models") or [])
        return _model_names(listing)

    def _get_json(self, path: str, timeout: float) -> dict:
        response = self.session.get(self.url + path, timeout=timeout)
        response.raise_for_status()
        return response.json()


def _running(entry: dict) -> RunningModel:
    name = normalize_model(entry.get("model") or entry["name"])
    size = int(entry.get("size") or 0)
    return RunningModel(name, int(entry.get("size_vram") or 0), size, entry.get("expires_at"))


def _model_names(listing: dict) -> list[str]:
    return [normalize_model(m.get("model") or m["name"]) for m in listing.get("models") or []]


class BackendPool:
    """All backends and the greenlets that check their health and read their catalogs."""

    def __init__(self, specs: list[str], default_slots: int, interval: float) -> None:
        self.backends = [Backend(*parse_backend(s, default_slots)) for s in specs]
        self.interval = interval
        self.greenlets = Supervisor("backend pool")
        self._refreshing: gevent.Greenlet | None = None  # the catalog refresh misses share

    def __iter__(self):
        return iter(self.backends)

    def start(self, on_change: Callable[[], None]) -> None:
        """Check every backend now and then every `interval` seconds (restarted if it crashes)."""
        self.greenlets.loop(HEALTH_LOOP, self._run, on_change)

    def stop(self) -> None:
        """Stop checking and close every connection."""
        self.greenlets.stop(grace=min(self.interval, 5.0))  # a check ends within its timeout
        for backend in self.backends:
            backend.session.close()
            backend.pool.close()

    def health_problem(self) -> str | None:
        """Why the health checks or catalog reads are not running as they should, or None."""
        return self.greenlets.health_problem()

    def check_all(self) -> None:
        """Check every backend at once, concurrently."""
        timeout = min(self.interval, 5.0)
        gevent.joinall([self._spawn_check(b, timeout) for b in self.backends])

    def _spawn_check(self, backend: Backend, timeout: float) -> gevent.Greenlet:
        def broke(error: BaseException) -> None:
            backend.mark_down(f"health check broke: {error!r}")

        return self.greenlets.spawn(f"check {backend.name}", backend.check, timeout, on_crash=broke)

    def candidates(self) -> list[Backend]:
        """Healthy backends, or all of them when none is (a request may still get through)."""
        return [b for b in self.backends if b.is_up] or self.backends

    def has_model(self, model: str) -> bool:
        """Whether a healthy backend may serve `model`, asking them again on a miss.

        The catalogs are read every `interval`; a model pulled or created since would get a
        false 404 until then. Misses arriving together share one refresh.
        """
        if any(b.has_model(model) for b in self.candidates()):
            return True
        self._refresh_models()
        return any(b.has_model(model) for b in self.candidates())

    def _refresh_models(self) -> None:
        if self._refreshing is None:
            self._refreshing = self.greenlets.spawn("catalog refresh", self._refresh_up)
        refreshing = self._refreshing
        refreshing.join()
        if self._refreshing is refreshing:
            self._refreshing = None

    def _refresh_up(self) -> None:
        timeout = min(self.interval, 5.0)
        backends = [b for b in self.backends if b.is_up]
        spawn = self.greenlets.spawn
        gevent.joinall([spawn(f"catalog {b.name}", b.refresh_models, timeout) for b in backends])

    def backend_for(self, model: str | None) -> Backend:
        """The backend for a call that needs no slot: a healthy one with `model`, if named."""
        candidates = self.candidates()
        if model:
            return next((b for b in candidates if b.has_model(model)), candidates[0])
        return candidates[0]

    def _run(self, on_change: Callable[[], None]) -> None:
        while True:
            self.check_all()
            on_change()  # health or models changed: waiting requests may now fit
            self.greenlets.recovered(HEALTH_LOOP)
            gevent.sleep(self.interval)
