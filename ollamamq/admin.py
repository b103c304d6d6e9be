"""The admin dashboard's pages: server-rendered, then refreshed by admin.js from fragments."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for
from flask_limiter import RateLimitExceeded
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from . import audit, formats, views
from .auth import (
    LoopbackOnly,
    check_csrf,
    has_password,
    is_admin,
    is_failed_attempt,
    local_target,
    log_in,
    log_out,
    login_limit,
    private,
    require_admin,
    require_admin_page,
)
from .extensions import limiter
from .services import keys as key_ring

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.record_once(lambda state: formats.register(state.app))
bp.after_request(private)
bp.after_request(audit.record_response)  # logins, logouts, keys made on the page


def users_view() -> dict:
    """Users sorted as the page's query string asks."""
    order = request.args.get("order", "asc")
    data = views.users_data(request.args.get("sort", "user"), order == "desc")
    return data | {"addresses": views.addresses_data()}


def queue_view() -> dict:
    """The queue, with the waiting requests grouped per user."""
    data = views.queue_data()
    return data | {"groups": views.by_user(data["waiting"])}


def overview_view() -> dict:
    """The overview, with the throughput charts' geometry."""
    data = views.overview_data()
    points = data["throughput"]
    return data | {"charts": {k: views.bars(points, k) for k in ("requests", "tokens")}}


def downloads_view() -> dict:
    """The download jobs, with the actions each one allows."""
    actions = {"job_actions": views.JOB_ACTIONS, "button_styles": views.BUTTON_STYLES}
    return views.downloads_data() | actions


LIVE: dict[str, Callable[[], dict]] = {  # pages whose data admin.js refreshes
    "overview": overview_view,
    "users": users_view,
    "queue": queue_view,
    "downloads": downloads_view,
}


@bp.context_processor
def page_globals() -> dict:
    """What base.html shows on every page."""
    return {"has_password": has_password(), "is_admin": is_admin()}


def live_page(name: str) -> str:
    """A live page: its fragment rendered in place, refreshed from /admin/fragment/<name>."""
    return render_template(f"admin/{name}.html", page=name, **LIVE[name]())


@bp.get("/")
@require_admin_page
def overview() -> str:
    """Backends, totals, throughput, uptime and version."""
    return live_page("overview")


@bp.get("/users")
@require_admin_page
def users() -> str:
    """Every user seen, sortable; block and unblock."""
    return live_page("users")


@bp.get("/queue")
@require_admin_page
def queue() -> str:
    """Waiting requests per user and the ones streaming now; cancel a waiting one."""
    return live_page("queue")


@bp.get("/downloads")
@require_admin_page
def downloads() -> str:
    """Download jobs with progress; process, cancel, retry, remove."""
    return live_page("downloads")


@bp.route("/keys", methods=["GET", "POST"])
@require_admin_page
def keys() -> tuple[str, int] | str:
    """API keys: create one (shown once, here), list them, revoke."""
    created, error = None, None
    if request.method == "POST":
        form = request.form
        try:
            days = float(form["expires_days"]) if form.get("expires_days") else None
            created = key_ring().create(
                form.get("user", ""), form.get("role", "user"), days, form.get("note", "")
            )[0]
        except ValueError as exc:
            error = str(exc)
    page = render_template(
        "admin/keys.html", page="keys", created=created, error=error, **views.keys_data()
    )
    return (page, 400) if error else page


@bp.get("/activity")
@require_admin_page
def activity() -> str:
    """The audit trail: who did what, when, from where."""
    return render_template("admin/activity.html", page="activity", events=audit.events())


@bp.get("/settings")
@require_admin_page
def settings() -> str:
    """The effective configuration, read-only, secrets masked."""
    data = views.settings_data() | {"notes": views.setting_notes()}
    return render_template("admin/settings.html", page="settings", **data)


@bp.get("/fragment/<name>")
@require_admin
def fragment(name: str) -> str:
    """The live part of a page, for admin.js to swap in."""
    if name not in LIVE:
        abort(404)
    return render_template(f"admin/_{name}.html", **LIVE[name]())


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(login_limit, methods=["POST"], deduct_when=is_failed_attempt)
def login() -> Response | tuple[str, int] | str:
    """The password form; the limit counts wrong passwords per client address."""
    target = local_target(request.args.get("next"), url_for("admin.overview"))
    if is_admin():
        return redirect(target)
    if not has_password():
        raise LoopbackOnly()
    if request.method == "GET":
        return render_template("admin/login.html", page="login")
    check_csrf()
    if log_in(request.form.get("password", "")):
        return redirect(target)
    return render_template("admin/login.html", page="login", error="Wrong password."), 401


@bp.post("/logout")
@require_admin_page
def logout() -> Response:
    """End the session (CSRF-checked like every admin POST)."""
    log_out()
    return redirect(url_for("admin.login"))


def render_error(status: int, message: str) -> tuple[str, int]:
    """A small error page in the dashboard's look."""
    return render_template("admin/error.html", status=status, message=message), status


@bp.errorhandler(RateLimitExceeded)
def too_many(exc: RateLimitExceeded) -> tuple[str, int]:
    """Too many wrong passwords: the login page says when to try again."""
    message = f"Too many login attempts ({exc.description}). Try again in a minute."
    return render_template("admin/login.html", page="login", error=message), 429


@bp.errorhandler(CSRFError)
def bad_csrf(exc: CSRFError) -> tuple[str, int]:
    """A form without a valid CSRF token (an old tab, or another site's form)."""
    return render_error(400, f"{exc.description} Reload the page and try again.")


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> tuple[str, int]:
    """Other errors on pages, in the dashboard's look."""
    return render_error(exc.code or 500, exc.description or exc.name)
