"""`GET /metrics` for Prometheus: state read at scrape time, finished requests counted once.

Gauges (queue, backends, downloads) come from a custom collector that reads the owners'
state when Prometheus scrapes, so the hot path pays nothing for them. What only a request
knows (its status, waits, tokens) is counted once, from its `Finished` record at close.
Each app has its own registry: tests build many apps in one process.
"""

from __future__ import annotations

import hmac
import itertools
from bisect import bisect_left
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from .accesslog import Finished
from .auth import bearer, is_admin, is_loopback
from .dispatcher import Dispatcher
from .errors import json_error
from .extensions import db
from .models import PullJob
from .pulls import PullService

bp = Blueprint("prometheus", __name__)

REGISTRY_KEY = "ollamamq.metrics"
# LLM waits run from sub-second to minutes: queueing behind long generations, model loads.
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
QUEUED = frozenset(
    ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
    + ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
)
RATE_LIMITS = {  # (kind of endpoint, status) -> reason, for ollamamq_rate_limited_total
    ("queued", 429): "user_queue",
    ("queued", 503): "queue_full",
    ("/api/pull", 429): "download_quota",
    ("admin", 429): "admin_login",
}


class Buckets:
    """One histogram's counts: a list index and two additions per observation, no lock."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """Cumulative buckets, as Prometheus wants them."""
        counts = list(itertools.accumulate(self.counts))
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        return HistogramMetricFamily(
            name, documentation, buckets=list(zip(edges, counts, strict=True)), sum_value=self.total
        )


class Metrics(Collector):
    """Owns the request counters; `observe` is called once per request, `collect` per scrape.

    Plain dicts and lists, not prometheus_client's metric objects: those take a lock per
    increment (a gevent lock in Python once patched), 9 of them per request, ~15 µs in all.
    One gevent thread updates them and no method yields, so nothing needs a lock.
    """

    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry()
        self.per_user = bool(app.config["METRICS_PER_USER"])
        self.user_label = ("user",) if self.per_user else ()
        self.requests: dict[tuple[str, ...], float] = {}  # (endpoint, status[, user])
        self.tokens: dict[tuple[str, ...], float] = {}  # (direction[, user])
        self.rate_limited = dict.fromkeys(((r,) for r in set(RATE_LIMITS.values())), 0.0)
        if not self.per_user:
            self.tokens |= {("input",): 0.0, ("output",): 0.0}  # present at 0 from the start
        self.wait = Buckets(WAIT_BUCKETS)
        self.first_token = Buckets(WAIT_BUCKETS)
        self.duration = Buckets(WAIT_BUCKETS)
        self.registry.register(self)
        self.registry.register(StateCollector(app))

    def observe(self, record: Finished) -> None:
        """Count one finished request."""
        user = (record.user,) if self.per_user else ()
        _add(self.requests, (record.endpoint, str(record.status), *user), 1)
        self.duration.observe(record.duration_ms / 1000)
        if record.wait_ms is not None:
            self.wait.observe(record.wait_ms / 1000)
        if record.first_token_ms is not None:
            self.first_token.observe(record.first_token_ms / 1000)
        if record.tokens_in:
            _add(self.tokens, ("input", *user), record.tokens_in)
        if record.tokens_out:
            _add(self.tokens, ("output", *user), record.tokens_out)
        kind = "queued" if record.endpoint in QUEUED else record.endpoint
        self.count_limited(kind, record.status)

    def count_limited(self, kind: str, status: int) -> None:
        """Count an answer that a limit gave, if it is one."""
        reason = RATE_LIMITS.get((kind, status))
        if reason is not None:
            _add(self.rate_limited, (reason,), 1)

    def collect(self) -> Iterator[Metric]:
        yield _counter(
            "requests",
            "Proxied requests answered, by endpoint and status",
            ("endpoint", "status", *self.user_label),
            self.requests,
        )
        yield _counter(
            "tokens",
            "Tokens processed, as the backends counted them",
            ("direction", *self.user_label),
            self.tokens,
        )
        yield _counter(
            "rate_limited", "Requests refused by a limit, by reason", ("reason",), self.rate_limited
        )
        yield self.wait.family("ollamamq_queue_wait_seconds", "Time queued before a backend slot")
        yield self.first_token.family(
            "ollamamq_time_to_first_token_seconds", "From arrival to the first byte of the answer"
        )
        yield self.duration.family(
            "ollamamq_request_duration_seconds", "From arrival to the end of the answer"
        )


def _add(counts: dict[tuple[str, ...], float], key: tuple[str, ...], amount: float) -> None:
    counts[key] = counts.get(key, 0.0) + amount


def _counter(
    name: str, documentation: str, labels: tuple[str, ...], counts: dict[tuple[str, ...], float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"ollamamq_{name}", documentation, labels=labels)
    for key, value in list(counts.items()):  # a copy: a request may finish while we scrape
        family.add_metric(list(key), value)
    return family


class StateCollector(Collector):
    """Reads the dispatcher, the backends and the download jobs when Prometheus scrapes."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        dispatcher: Dispatcher = self.app.extensions["ollamamq"]
        yield from _queue(dispatcher, bool(self.app.config["METRICS_PER_USER"]))
        yield from _backends(dispatcher)
        if (cluster := dispatcher.cluster_state()) is not None:
            yield from _cluster(cluster)
        with self.app.app_context():
            yield from _downloads(self.app.extensions["ollamamq.pulls"])


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"ollamamq_{name}", documentation, labels=labels or None)


def _queue(dispatcher: Dispatcher, per_user: bool) -> Iterator[Metric]:
    labels = ("user",) if per_user else ()
    waiting = _gauge("queue_waiting", "Requests waiting for a backend slot", labels)
    active = _gauge("requests_active", "Requests holding a backend slot", labels)
    if per_user:
        for user in dispatcher.snapshot().users:
            waiting.add_metric([user.user], user.waiting)
            active.add_metric([user.user], user.active)
    else:
        waiting.add_metric([], dispatcher.waiting_count)
        active.add_metric([], dispatcher.active_count)
    yield from (waiting, active)


def _backends(dispatcher: Dispatcher) -> Iterator[Metric]:
    up = _gauge("backend_up", "1 if the backend answered its last check", ("backend",))
    slots = _gauge("backend_slots", "Requests the backend may serve at once", ("backend",))
    active = _gauge("backend_active", "Requests the backend is serving now", ("backend",))
    latency = _gauge("backend_latency_seconds", "Duration of the last health check", ("backend",))
    loaded = _gauge(
        "backend_model_loaded", "1 for each model loaded in memory", ("backend", "model")
    )
    for backend in dispatcher.pool:
        up.add_metric([backend.name], 1 if backend.is_up else 0)
        slots.add_metric([backend.name], backend.slots)
        active.add_metric([backend.name], backend.active)
        if backend.latency_ms is not None:
            latency.add_metric([backend.name], backend.latency_ms / 1000)
        for model in sorted(backend.loaded):
            loaded.add_metric([backend.name, model], 1)
    yield from (up, slots, active, latency, loaded)


REPLICA_ROLE = ("replica", "role")


def _cluster(state: dict) -> Iterator[Metric]:
    """Replicas only: this one's id and role, and every live replica's queue as Redis has it."""
    info = _gauge("replica_info", "1, labelled with this replica's id and role", REPLICA_ROLE)
    info.add_metric([state["replica"], state["role"]], 1)
    waiting = _gauge("cluster_waiting", "Requests waiting on each live replica", ("replica",))
    active = _gauge("cluster_active", "Requests holding a slot, by replica", ("replica",))
    for name, summary in state.get("replicas", {}).items():
        waiting.add_metric([name], summary["waiting"])
        active.add_metric([name], summary["active"])
    inflight = _gauge(
        "cluster_backend_inflight", "Requests in flight on a backend, all replicas", ("backend",)
    )
    for backend, count in state.get("inflight", {}).items():
        inflight.add_metric([backend], count)
    yield from (info, waiting, active, inflight)


def _downloads(pulls: PullService) -> Iterator[Metric]:
    jobs = _gauge("downloads", "Download jobs by status", ("status",))
    counts = pulls.counts()
    for status in ("pending", "downloading", "completed", "failed", "cancelled"):
        jobs.add_metric([status], counts.get(status, 0))
    # The jobs' own byte counts: finished jobs pruned after CLEANUP_DAYS read as a reset.
    done = db.session.scalar(select(func.coalesce(func.sum(PullJob.completed_bytes), 0)))
    total = CounterMetricFamily("ollamamq_download_bytes", "Bytes downloaded by the jobs on record")
    total.add_metric([], int(done or 0))
    yield from (jobs, total)


def may_scrape() -> bool:
    """Loopback, the admin, or the scraper's bearer METRICS_TOKEN."""
    token, given = current_app.config["METRICS_TOKEN"], bearer()
    if token and given is not None and hmac.compare_digest(token.encode(), given.encode()):
        return True
    return is_loopback() or is_admin()


@bp.get("/metrics")
def metrics() -> Response:
    """Everything in Prometheus' text format."""
    if not may_scrape():
        return json_error(401, "metrics need loopback, the admin login or METRICS_TOKEN")
    registry = current_app.extensions[REGISTRY_KEY].registry
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> Metrics:
    """Create the app's metrics and serve them; wrong admin passwords count as limited."""
    counters = app.extensions[REGISTRY_KEY] = Metrics(app)
    app.register_blueprint(bp)

    @app.after_request
    def count_admin_limits(response: Response) -> Response:
        if response.status_code == 429 and request.blueprint in ("admin", "admin_api"):
            counters.count_limited("admin", 429)
        return response

    return counters
