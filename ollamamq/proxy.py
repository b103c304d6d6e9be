"""Ollama's native API: generation queued fairly, everything else relayed straight through."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import text

from . import services
from .catalog import queued_entry, union
from .extensions import db
from .identity import user_of
from .paths import check_digest
from .payloads import json_object, model_named_in
from .relay import serve_direct, serve_queued
from .services import dispatcher, pulls, scheduler

bp = Blueprint("proxy", __name__)

QUEUED = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
DIRECT = ("/", "/api/version")  # GET and HEAD, straight through
MANAGEMENT = ("/api/create", "/api/copy", "/api/push")  # JSON in, streamed out, no slot


def _queued(path: str):
    return lambda: serve_queued(path)


def _direct(path: str):
    return lambda: serve_direct(path)


def _managed(path: str):
    def view() -> Response:
        body = request.get_data()
        json_object(body)  # malformed JSON is our 400, not the backend's
        return serve_direct(path, body)

    return view


for _path in QUEUED:
    bp.add_url_rule(_path, f"queued{_path}", _queued(_path), methods=["POST"])
for _path in DIRECT:
    bp.add_url_rule(_path, f"direct{_path}", _direct(_path), methods=["GET", "HEAD"])
for _path in MANAGEMENT:
    bp.add_url_rule(_path, f"direct{_path}", _managed(_path), methods=["POST"])


@bp.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
def blobs(digest: str) -> Response:
    """Model layer uploads, streamed through without holding them in memory."""
    return serve_direct(f"/api/blobs/{check_digest(digest)}")


@bp.post("/api/show")
def show() -> Response:
    """A model's details, from a backend that has it."""
    body = request.get_data()
    return serve_direct("/api/show", body, model_named_in(json_object(body)))


@bp.get("/api/tags")
def tags() -> Response:
    """Installed models across every backend, and queued ones when asked to show them."""
    entries = union(dispatcher().pool, "/api/tags")
    if current_app.config["SHOW_QUEUED_IN_TAGS"]:
        pending = pulls().pending()
        entries += [queued_entry(j.model, j.as_dict()["created_at"]) for j in pending]
    return jsonify(models=entries)


@bp.get("/api/ps")
def ps() -> Response:
    """Models loaded now on any backend."""
    return jsonify(models=union(dispatcher().pool, "/api/ps"))


@bp.get("/api/position")
def position() -> Response:
    """Where the caller's requests stand: place in line and estimated wait of each."""
    queue = dispatcher()
    user = user_of()
    snapshot = queue.snapshot()
    waiting = [
        {
            "id": t.id,
            "model": t.model,
            "path": t.path,
            "position": place,
            "waited_s": round(t.wait_ms / 1000, 3),
            "estimated_wait_s": round(eta, 1),
        }
        for t, place, eta in queue.positions(user)
    ]
    active = [
        {
            "id": t.id,
            "model": t.model,
            "path": t.path,
            "backend": t.backend,
            "seconds": round(t.seconds, 3),
            "tokens": t.records,
        }
        for t in snapshot.active
        if t.user == user
    ]
    return jsonify(
        user=user, waiting=waiting, active=active, average_service_s=round(queue.service_s, 3)
    )


@bp.get("/health")
def health() -> Response:
    """Reachability and latency of each backend, queue depth and active requests."""
    queue = dispatcher()
    if queue.is_draining:  # at once, so a load balancer stops sending
        draining = jsonify(status="draining", active=queue.active_count)
        draining.status_code = 503
        return draining
    backends = [
        {
            "name": b.name,
            "url": b.url,
            "up": b.is_up,
            "latency_ms": b.latency_ms,
            "active": b.active,
            "slots": b.slots,
            "error": b.error,
        }
        for b in queue.pool
    ]
    database = _database_state()
    problems = services.problems()
    is_ok = any(b["up"] for b in backends) and database == "ok" and not problems
    cluster = queue.cluster_state()
    is_ok = is_ok and (cluster is None or cluster["redis"] == "ok")
    return jsonify(
        status="ok" if is_ok else "degraded",
        problems=problems,
        backends=backends,
        queue_depth=queue.waiting_count,
        active=queue.active_count,
        database=database,
        disk=pulls().disk_state(),
        scheduler=_scheduler_state(),
        **({"cluster": cluster} if cluster else {}),
    )


def _database_state() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is the answer here
        return f"error: {exc}"


def _scheduler_state() -> dict:
    service = pulls()
    next_run = service.next_run()
    return {
        "running": scheduler().running,
        "next_run": next_run.isoformat(timespec="seconds") + "Z" if next_run else None,
        "processing_downloads": service.is_running,
        "window_open": service.is_window_open(),
    }
