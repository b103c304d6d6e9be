"""Who may use the admin: a password holder, or anyone on loopback when no password is set."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from flask import current_app, request, session
from werkzeug.security import check_password_hash, generate_password_hash

from .errors import json_error

F = TypeVar("F", bound=Callable)
HASH_KEY = "ollamamq.admin_hash"


def init_auth(app) -> None:
    """Hash the admin password once; only the hash stays in memory."""
    password = app.config["ADMIN_PASSWORD"]
    app.extensions[HASH_KEY] = generate_password_hash(password) if password else None


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
    return stored is not None and check_password_hash(stored, candidate)


def is_admin() -> bool:
    """A logged-in session, a Bearer password, or loopback when there is no password."""
    if not has_password():
        return is_loopback()
    if session.get("admin") is True:
        return True
    auth = request.headers.get("Authorization", "")
    return auth[:7].lower() == "bearer " and password_matches(auth[7:].strip())


def same_token(a: str, b: str) -> bool:
    """Constant-time string comparison."""
    return hmac.compare_digest(a.encode(), b.encode())


def require_admin(view: F) -> F:
    """JSON 401/403 for API callers who are not the admin."""

    @wraps(view)
    def guarded(*args, **kwargs):
        if is_admin():
            return view(*args, **kwargs)
        if has_password():
            return json_error(401, "admin login required (Authorization: Bearer <password>)")
        return json_error(403, "the admin is reachable only from loopback: set a password")

    return guarded  # type: ignore[return-value]
