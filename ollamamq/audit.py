"""The audit trail: every admin action and key event, with who, what, when and from where."""

from __future__ import annotations

import logging

from flask import Response, has_request_context, request, session
from sqlalchemy import select

from .auth import credential
from .extensions import client_address, db
from .keys import KEY_PREFIX
from .models import AuditEvent
from .services import keys

log = logging.getLogger(__name__)

SAFE_FIELDS = ("user", "role", "note", "expires_days", "weight", "vip", "blocked", "id", "ids")
SHOWN = 200  # events the Activity page and the API list


def actor() -> str:
    """Who is acting: an admin key's owner, the password, the session, loopback or the CLI."""
    if not has_request_context():
        return "cli"
    token = credential() or ""
    if token.startswith(KEY_PREFIX):
        entry = keys().find(token)
        return f"key {entry.id} ({entry.user})" if entry else "invalid key"
    if token:
        return "admin password"
    if session.get("admin") is True:
        return "admin session"
    return "loopback"


def record(action: str, target: str = "", detail: str = "", status: int = 200) -> None:
    """Store one event (and log it); in a request, its actor and address come from it."""
    address = client_address() if has_request_context() else ""
    event = AuditEvent(
        actor=actor(),
        action=action,
        target=target[:300],
        detail=detail,
        address=address,
        status=status,
    )
    db.session.add(event)
    db.session.commit()
    log.info(
        "audit: %s %s %s by %s from %s -> %d",
        action,
        target,
        detail,
        event.actor,
        address or "-",
        status,
    )


def record_response(response: Response) -> Response:
    """After an admin POST: what was asked, of what, and how it ended."""
    if request.method == "POST" and request.endpoint:
        action = request.endpoint.rsplit(".", 1)[-1]
        target = "/".join(str(v) for v in (request.view_args or {}).values())
        record(action, target, _safe_detail(), response.status_code)
    return response


def _safe_detail() -> str:
    """The request's harmless fields: names and flags, never a password or a key."""
    fields = request.get_json(silent=True) if request.is_json else request.form.to_dict()
    if not isinstance(fields, dict):
        return ""
    shown = {k: fields[k] for k in SAFE_FIELDS if k in fields}
    return " ".join(f"{k}={v}" for k, v in shown.items())


def events() -> list[dict]:
    """The newest events first."""
    rows = db.session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(SHOWN))
    return [
        {
            "id": e.id,
            "at": e.at.isoformat(timespec="seconds") + "Z",
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "detail": e.detail,
            "address": e.address,
            "status": e.status,
        }
        for e in rows
    ]
