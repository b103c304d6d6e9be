"""Ollama's native API: generation queued fairly, everything else relayed straight through."""

from __future__ import annotations

import shutil

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from .extensions import db
from .relay import dispatcher, serve_direct, serve_queued

bp = Blueprint("proxy", __name__)

QUEUED = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
DIRECT = (
    ("/", ("GET", "HEAD")),
    ("/api/ps", ("GET",)),
    ("/api/version", ("GET",)),
    ("/api/show", ("POST",)),
    ("/api/create", ("POST",)),
    ("/api/copy", ("POST",)),
    ("/api/push", ("POST",)),
)


def _queued(path: str):
    return lambda: serve_queued(path)


def _direct(path: str):
    return lambda: serve_direct(path)


for _path in QUEUED:
    bp.add_url_rule(_path, f"queued{_path}", _queued(_path), methods=["POST"])
for _path, _methods in DIRECT:
    bp.add_url_rule(_path, f"direct{_path}", _direct(_path), methods=list(_methods))


@bp.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
def blobs(digest: str) -> Response:
    """Model layer uploads, streamed through without holding them in memory."""
    return serve_direct(f"/api/blobs/{digest}")


@bp.get("/health")
def health() -> Response:
    """Reachability and latency of each backend, queue depth and active requests."""
    queue = dispatcher()
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
    status = "ok" if any(b["up"] for b in backends) and database == "ok" else "degraded"
    return jsonify(
        status=status,
        backends=backends,
        queue_depth=queue.waiting_count,
        active=queue.active_count,
        database=database,
        disk=_disk_state(),
        scheduler=_scheduler_state(),
    )


def _database_state() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is the answer here
        return f"error: {exc}"


def _disk_state() -> dict | None:
    path = current_app.config["DISK_PATH"]
    if not path:
        return None
    usage = shutil.disk_usage(path)
    percent = round(100 * usage.used / usage.total, 1)
    threshold = current_app.config["DISK_THRESHOLD"]
    return {
        "path": path,
        "used_percent": percent,
        "threshold": threshold,
        "accepting_downloads": percent <= threshold,
    }


def _scheduler_state() -> dict:
    pulls = current_app.extensions["ollamamq.pulls"]
    next_run = pulls.next_run()
    return {
        "running": current_app.extensions["ollamamq.scheduler"].running,
        "next_run": next_run.isoformat(timespec="seconds") + "Z" if next_run else None,
        "processing_downloads": pulls.is_running,
        "window_open": pulls.is_window_open(),
    }
