"""Who may use the admin: a password holder, or anyone on loopback when no password is set."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable
from functools import wraps
from typing import TypeVar
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, redirect, request, session, url_for
from werkzeug.exceptions import Forbidden

from .errors import json_error
from .extensions import csrf
from .keys import KEY_PREFIX, RING_KEY

F = TypeVar("F", bound=Callable)
HASH_KEY = "ollamamq.admin_hash"
PEPPER_KEY = "ollamamq.admin_pepper"
# Inline style attributes draw the bars; no inline script anywhere, so XSS has nowhere to run.
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


class LoopbackOnly(Forbidden):
    """No admin password is set and the client is not on this machine."""

    description = (
        "No admin password is set, so the admin is reachable only from this machine. "
        "Set OLLAMAMQ_ADMIN_PASSWORD and restart to open it to other machines."
    )


def init_auth(app: Flask) -> None:
    """Keep only a keyed hash of the admin password in memory; bind CSRF protection."""
    # A keyed SHA-256, not scrypt: the hash never leaves this process, so a slow hash buys
    # nothing, while scrypt's ~70 ms per check would stall every greenlet on each API call.
    pepper = os.urandom(32)
    password = app.config["ADMIN_PASSWORD"]
    app.extensions[PEPPER_KEY] = pepper
    app.extensions[HASH_KEY] = _digest(pepper, password) if password else None
    csrf.init_app(app)


def _digest(pepper: bytes, password: str) -> bytes:
    return hmac.new(pepper, password.encode(), hashlib.sha256).digest()


def has_password() -> bool:
    """Whether an admin password is configured."""
    return current_app.extensions[HASH_KEY] is not None


def is_loopback() -> bool:
    """Whether the client is on this machine."""
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def password_matches(candidate: str) -> bool:
    """Compare with the configured password's hash (in constant time)."""
    stored = current_app.extensions[HASH_KEY]
    given = _digest(current_app.extensions[PEPPER_KEY], candidate)
    return stored is not None and hmac.compare_digest(stored, given)


def bearer() -> str | None:
    """The password or key sent as `Authorization: Bearer <secret>`, if any."""
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def credential() -> str | None:
    """A key or password sent as `Authorization: Bearer ...` (the openai SDK) or `X-API-Key`."""
    return bearer() or request.headers.get("X-API-Key", "").strip() or None


def holds_admin_credential() -> bool:
    """An admin API key (Bearer or X-API-Key), or the admin password.

    Keys start with `omq_`; anything else is checked as the password, never as a key.
    """
    token = credential()
    if not token:
        return False
    if token.startswith(KEY_PREFIX):
        entry = current_app.extensions[RING_KEY].find(token)
        return entry is not None and entry.role == "admin"
    return password_matches(token)


def is_admin() -> bool:
    """An admin key, a logged-in session, a Bearer password; loopback when no password is set."""
    if holds_admin_credential() or session.get("admin") is True:
        return True
    return not has_password() and is_loopback()


def log_in(password: str) -> bool:
    """Start an admin session if the password is right; a fresh session either way."""
    session.clear()  # a new CSRF token too: nothing from before the login carries over
    if not password_matches(password):
        return False
    session["admin"] = True
    return True


def log_out() -> None:
    """End the admin session."""
    session.clear()


def is_failed_attempt(response: Response) -> bool:
    """Whether a password was tried and refused: what the login limit counts."""
    tried = bearer() is not None or "password" in request.form
    return response.status_code == 401 and tried


def login_limit() -> str:
    """Password attempts allowed per client address (Flask-Limiter's notation)."""
    return current_app.config["ADMIN_LOGIN_LIMIT"]


def check_csrf() -> None:
    """Admin POSTs need the session's CSRF token (400 without it).

    Requests carrying `Authorization: Bearer` are exempt: a browser cannot add that header
    to a cross-site request without a CORS preflight, which is never granted.
    """
    if request.method == "POST" and bearer() is None:
        csrf.protect()


def require_admin(view: F) -> F:
    """JSON 401/403 for API callers who are not the admin."""

    @wraps(view)
    def guarded(*args, **kwargs):
        if is_admin():
            return view(*args, **kwargs)
        return refusal()

    return guarded  # type: ignore[return-value]


def refusal() -> Response:
    """The JSON answer to someone who is not the admin."""
    if has_password():
        return json_error(401, "admin login required (Authorization: Bearer <password>)")
    return json_error(403, "the admin is reachable only from loopback: set a password")


def require_admin_page(view: F) -> F:
    """Pages: anonymous browsers go to the login page; no password means loopback only."""

    @wraps(view)
    def guarded(*args, **kwargs):
        if is_admin():
            check_csrf()
            return view(*args, **kwargs)
        if not has_password():
            raise LoopbackOnly()
        return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))

    return guarded  # type: ignore[return-value]


def private(response: Response) -> Response:
    """Admin answers: never cached, never framed, scripts and styles only from here."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = CSP
    return response


def local_target(url: str | None, default: str) -> str:
    """`url` if it points inside the admin on this server, else `default` (no open redirects)."""
    if not url:
        return default
    parts = urlsplit(url)
    if parts.netloc not in ("", request.host) or not parts.path.startswith("/admin"):
        return default
    return parts.path + (f"?{parts.query}" if parts.query else "")
