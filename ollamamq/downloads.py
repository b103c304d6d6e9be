"""The download queue's HTTP face: pulls are queued, listed, removed and processed here."""

from __future__ import annotations

import json
import time

from flask import Blueprint, Response, current_app, jsonify, request
from limits import parse

from .audit import record
from .auth import bearer, is_failed_attempt, login_limit, require_admin
from .errors import json_error
from .extensions import client_address, limiter
from .identity import current
from .jobstore import JobView
from .payloads import json_object, loads
from .relay import serve_direct
from .services import pulls

bp = Blueprint("downloads", __name__)

NDJSON = "application/x-ndjson"


def answer(record: dict, stream: bool, status: int = 200) -> Response:
    """One record in Ollama's pull dialect: an NDJSON line when streaming, else JSON."""
    if stream:
        return Response(json.dumps(record, separators=(",", ":")) + "\n", status, mimetype=NDJSON)
    response = jsonify(record)
    response.status_code = status
    return response


def queued_record(job: JobView, created: bool) -> dict:
    """What a client is told about its queued download."""
    next_run = pulls().next_run()
    when = next_run.isoformat(timespec="seconds") + "Z" if next_run else None
    state = "added to" if created else "already in"
    return {
        "status": "queued" if job.status == "pending" else job.status,
        "message": f"{job.model} {state} the download queue; downloads run at {when}",
        "job": job.id,
        "model": job.model,
        "position": job.position,
        "scheduled_for": when,
    }


def quota_holder() -> str:
    """Who the daily quota counts: the key's user with keys, else the client address."""
    identity = current()
    return f"user:{identity.user}" if identity.key_id is not None else client_address()


def quota_retry_after() -> int | None:
    """Count a new download against the caller's daily quota; seconds to wait if spent."""
    limit = parse(f"{current_app.config['RATE_LIMIT']}/day")
    if limiter.limiter.hit(limit, "pull-quota", quota_holder()):
        return None
    stats = limiter.limiter.get_window_stats(limit, "pull-quota", quota_holder())
    return max(1, int(stats.reset_time - time.time()))


def requested_model() -> tuple[str | None, dict]:
    """The model named by a JSON body (`model`, or the deprecated `name`)."""
    try:
        body = loads(request.get_data() or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return None, {}
    model = body.get("model") or body.get("name")
    return (model.strip() if isinstance(model, str) and model.strip() else None), body


@bp.post("/api/pull")
def pull() -> Response:
    """Queue a model download (or stream it at once while the off-peak window is open)."""
    model, body = requested_model()
    if model is None:
        return json_error(400, "model is required")
    stream = body.get("stream", True) is not False
    service = pulls()
    existing = service.active_job(model)
    if existing is not None:
        return answer(queued_record(existing, created=False), stream)
    if service.is_installed(model):
        return answer({"status": "success"}, stream)
    disk = service.disk_state()
    if disk is not None and not disk["accepting_downloads"]:
        return json_error(507, "the models disk is too full to queue another download")
    retry_after = quota_retry_after()
    if retry_after is not None:
        limit = current_app.config["RATE_LIMIT"]
        return json_error(
            429,
            f"download quota exceeded: {limit} new models per day",
            retry_after,
        )
    job, created = service.enqueue(model, client_address(), current().user)
    if not (created and service.is_window_open()):
        return answer(queued_record(job, created), stream)
    progress = service.watch(job.id)
    service.process([job.id])
    if stream:
        return Response(progress, mimetype=NDJSON)
    last = json.loads(list(progress)[-1])
    return answer(last, stream=False, status=500 if "error" in last else 200)


@bp.get("/api/queue")
def queue() -> Response:
    """Counts by status, pending jobs in order, what downloads now, and recent history."""
    service = pulls()
    jobs = service.jobs()
    next_run = service.next_run()
    return jsonify(
        counts=service.counts(),
        queue=[j.as_dict() for j in jobs if j.status == "pending"],
        downloading=[j.as_dict() for j in jobs if j.status == "downloading"],
        history=[j.as_dict() for j in jobs if j.status not in ("pending", "downloading")],
        next_run=next_run.isoformat(timespec="seconds") + "Z" if next_run else None,
        window_open=service.is_window_open(),
    )


@bp.delete("/api/queue")
def unqueue() -> Response:
    """Remove a model's pending download."""
    model, _ = requested_model()
    model = model or request.args.get("model")
    if not model:
        return json_error(400, "model is required")
    if not pulls().remove_model(model):
        return json_error(404, f"no pending download of '{model}'")
    return jsonify(status="removed", model=model)


@bp.post("/api/queue/process")
@limiter.limit(login_limit, deduct_when=is_failed_attempt)
@require_admin
def process_now() -> Response:
    """Process the queue now: every pending job, or the ones named by `id` / `ids`.

    A plain cross-site form cannot send JSON or a Bearer header: either is required.
    """
    if bearer() is None and not request.is_json:
        return json_error(400, "send a JSON body or an Authorization: Bearer header")
    _, body = requested_model()
    ids = body.get("ids") or ([body["id"]] if "id" in body else None)
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
        return json_error(400, "ids must be job numbers")
    service = pulls()
    pending = [j.id for j in service.pending() if ids is None or j.id in ids]
    service.process(ids)
    record("process_now", "downloads", f"jobs={pending}", 202)
    return jsonify(status="processing", jobs=pending), 202


@bp.delete("/api/delete")
def delete() -> Response:
    """Deleting a model that is only queued removes it from the queue; else Ollama deletes."""
    json_object(request.get_data())  # malformed JSON is our 400, not the backend's
    model, _ = requested_model()
    service = pulls()
    if model and service.remove_model(model) and not service.is_installed(model):
        return Response(status=200)
    return serve_direct("/api/delete", request.get_data(), model)
