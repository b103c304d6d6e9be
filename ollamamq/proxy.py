"""Ollama's native API: generation queued fairly, everything else relayed straight through."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from .relay import dispatcher, serve_direct, serve_queued

bp = Blueprint("proxy", __name__)

QUEUED = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
DIRECT = (
    ("/", ("GET", "HEAD")),
    ("/api/tags", ("GET",)),
    ("/api/ps", ("GET",)),
    ("/api/version", ("GET",)),
    ("/api/show", ("POST",)),
    ("/api/create", ("POST",)),
    ("/api/copy", ("POST",)),
    ("/api/delete", ("DELETE",)),
    ("/api/push", ("POST",)),
    ("/api/pull", ("POST",)),
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
    status = "ok" if any(b["up"] for b in backends) else "degraded"
    return jsonify(
        status=status,
        backends=backends,
        queue_depth=queue.waiting_count,
        active=queue.active_count,
    )
