"""The admin's JSON API (`/admin/api/...`): what the pages show, and the operators' actions.

Scripts authenticate with `Authorization: Bearer <password>`; the pages' own forms post here
with their session and CSRF token, and a plain form post is redirected back to its page.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, redirect, request, url_for

from . import audit, views
from .auth import (
    check_csrf,
    is_admin,
    is_failed_attempt,
    local_target,
    login_limit,
    private,
    refusal,
)
from .errors import json_error
from .extensions import limiter
from .jobstore import JobView
from .pulls import PullService
from .residency import ResidencyError, change
from .services import dispatcher, keys, networks, pulls, user_settings

bp = Blueprint("admin_api", __name__, url_prefix="/admin/api")
limiter.limit(login_limit, deduct_when=is_failed_attempt)(bp)  # wrong Bearer passwords
bp.after_request(private)
bp.after_request(audit.record_response)  # every action, allowed or not, in the trail

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@bp.before_request
def guard() -> Response | None:
    """Only the admin gets in; POSTs from a session need its CSRF token."""
    if not is_admin():
        return refusal()
    check_csrf()
    return None


def done(message: str, status: int = 200, **extra: object) -> Response:
    """An action's answer: JSON, or back to the page for a browser's plain form post."""
    if request.mimetype in FORM_TYPES:
        return redirect(local_target(request.referrer, url_for("admin.overview")), 303)
    response = jsonify(status="ok", message=message, **extra)
    response.status_code = status
    return response


@bp.get("/overview")
def overview() -> Response:
    """Version, uptime, fairness, totals, backends, throughput per minute."""
    return jsonify(views.overview_data())


@bp.get("/users")
def users() -> Response:
    """Every user seen; `?sort=<column>&order=desc` to sort."""
    descending = request.args.get("order") == "desc"
    return jsonify(views.users_data(request.args.get("sort", "user"), descending))


@bp.get("/queue")
def queue() -> Response:
    """Waiting requests in grant order, and the ones streaming now."""
    return jsonify(views.queue_data())


@bp.get("/downloads")
def downloads() -> Response:
    """Download jobs, counts by status, the next scheduled run."""
    return jsonify(views.downloads_data())


@bp.get("/settings")
def settings() -> Response:
    """The effective configuration, secrets masked."""
    return jsonify(views.settings_data())


@bp.post("/users/<path:user>/<any(block, unblock):action>")
def block(user: str, action: str) -> Response:
    """Block a user (new requests get 403) or unblock them; the choice survives restarts."""
    if user not in {u.user for u in dispatcher().snapshot().users}:
        return json_error(404, f"unknown user {user!r}")
    user_settings().update(user, blocked=action == "block")
    return done(f"user {user} {action}ed", user=user, blocked=action == "block")


@bp.post("/users/<path:user>/settings")
def update_user(user: str) -> Response:
    """Set a user's `weight`, `vip` and `blocked` (any of them); kept across restarts."""
    changes = request.get_json(silent=True) or request.form.to_dict()
    if not isinstance(changes, dict):
        return json_error(400, "send a JSON object of settings")
    changes.pop("csrf_token", None)
    try:
        row = user_settings().update(user, **changes)
    except (TypeError, ValueError) as exc:
        return json_error(400, str(exc))
    return done(
        f"user {user} updated", user=user, weight=row.weight, vip=row.vip, blocked=row.blocked
    )


@bp.get("/addresses")
def addresses() -> Response:
    """Blocked client addresses and networks, and the allowed networks."""
    return jsonify(views.addresses_data())


@bp.post("/addresses/<any(block, unblock):action>")
def block_address(action: str) -> Response:
    """Block (or unblock) `address`: an IP or a CIDR network; checked before anything else."""
    fields = request.get_json(silent=True) or request.form.to_dict() or request.args.to_dict()
    address = str(fields.get("address", "")) if isinstance(fields, dict) else ""
    try:
        if action == "block":
            network = networks().block(address, str(fields.get("note") or ""))
        elif not networks().unblock(address):
            return json_error(404, f"{address} is not blocked")
        else:
            network = address
    except ValueError:
        return json_error(400, f"not an IP address or network: {address!r}")
    return done(f"{network} {action}ed", network=network)


@bp.get("/audit")
def audit_trail() -> Response:
    """Admin actions and key events, newest first."""
    return jsonify(events=audit.events())


@bp.get("/keys")
def list_keys() -> Response:
    """Every API key (prefix, user, role, last use, expiry); never a key itself."""
    return jsonify(views.keys_data())


@bp.post("/keys")
def create_key() -> Response:
    """A new key: `user`, `role`, `expires_days`, `note`. The answer is the only copy."""
    fields = request.get_json(silent=True) or request.form.to_dict()
    if not isinstance(fields, dict):
        return json_error(400, "send a JSON object: user, role, expires_days, note")
    try:
        key, view = keys().create(
            str(fields.get("user") or ""),
            str(fields.get("role") or "user"),
            float(fields["expires_days"]) if fields.get("expires_days") else None,
            str(fields.get("note") or ""),
        )
    except ValueError as exc:
        return json_error(400, str(exc))
    return done(f"key {view.id} created for {view.user}", 201, key=key, entry=views.key_dict(view))


@bp.post("/keys/<int:key_id>/revoke")
def revoke_key(key_id: int) -> Response:
    """Revoke a key: refused from now on, here and (within a second) in other processes."""
    view = keys().revoke(key_id)
    if view is None:
        return json_error(404, f"no key {key_id}")
    return done(f"key {key_id} of {view.user} revoked", entry=views.key_dict(view))


@bp.post("/queue/<int:ticket_id>/cancel")
def cancel_request(ticket_id: int) -> Response:
    """Withdraw a waiting request; its client gets 410."""
    if not dispatcher().cancel(ticket_id):
        return json_error(404, f"request {ticket_id} is not waiting")
    return done(f"request {ticket_id} cancelled", id=ticket_id)


@bp.post("/downloads/process")
def process_all() -> Response:
    """Start every pending download now."""
    service = pulls()
    pending = [job.id for job in service.pending()]
    service.process()
    return done(f"processing {len(pending)} pending downloads", 202, jobs=pending)


def process_one(service: PullService, job: JobView) -> bool:
    """Start one pending job now."""
    if job.status != "pending":
        return False
    service.process([job.id])
    return True


JOB_ACTIONS = {
    "process": process_one,
    "cancel": lambda service, job: service.cancel(job.id),
    "retry": lambda service, job: service.retry(job.id),
    "remove": lambda service, job: service.remove(job.id),
}


@bp.post("/downloads/<int:job_id>/<any(process, cancel, retry, remove):action>")
def job_action(job_id: int, action: str) -> Response:
    """Process, cancel, retry or remove one job: 404 if unknown, 409 if its status forbids."""
    service = pulls()
    job = service.get(job_id)
    if job is None:
        return json_error(404, f"no download job {job_id}")
    if not JOB_ACTIONS[action](service, job):
        return json_error(409, f"cannot {action} job {job_id}: it is {job.status}")
    return done(f"job {job_id}: {action} done", id=job_id)


@bp.post("/backends/<name>/models/<path:model>/<any(load, unload):action>")
def model_residency(name: str, model: str, action: str) -> Response:
    """Load a model into a backend's memory or unload it, once a slot there is free."""
    timeout = (current_app.config["CONNECT_TIMEOUT"], current_app.config["TIMEOUT"])
    try:
        answer = change(dispatcher(), name, model, action == "load", timeout)
    except ResidencyError as exc:
        return json_error(exc.status, str(exc))
    reason = answer.get("done_reason", action)
    return done(f"{model} on {name}: {action} done", backend=name, model=model, reason=reason)
