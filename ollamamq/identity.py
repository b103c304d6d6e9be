"""Who a request is, resolved once per request here; everything downstream reads the result.

Three modes, by what the operator configured:
- no keys at all: open, as ollamaMQ is: `X-User-ID`, else the API key's fingerprint, else
  the client address;
- shared keys (`API_KEY`): ollamaMQ's key; its holders are trusted to name users;
- any per-user key (`ollamamq keys create`): every request needs a valid key. A `user` key is
  its user (`X-User-ID` is ignored), a `gateway` key names its end users as `KEYUSER:ID`, an
  `admin` key may also manage models and the admin.

API keys start with `omq_`; any other bearer token is a shared key here and the admin
password only on the admin's own routes, so neither is ever taken for the other.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

from flask import Flask, current_app, request
from limits import parse
from werkzeug.exceptions import Forbidden, TooManyRequests, Unauthorized

from .auth import credential, holds_admin_credential
from .extensions import client_address, limiter
from .keys import KEY_PREFIX, RING_KEY, KeyEntry, KeyRing
from .network import NetworkRules
from .services import dispatcher, keys

log = logging.getLogger(__name__)

ENVIRON_KEY = "ollamamq.identity"
NETWORKS_KEY = "ollamamq.networks"
GUARDED = ("proxy", "openai_api", "downloads")  # blueprints whose requests are identified
OPEN_PATHS = frozenset({"/health"})  # answered without a key
ADMIN_ONLY = (  # (method, path prefix) that manage models or the queue: admin keys only
    ("DELETE", "/api/delete"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("POST", "/api/push"),
    ("HEAD", "/api/blobs/"),
    ("POST", "/api/blobs/"),
    ("POST", "/api/queue/process"),
)


@dataclass(frozen=True, slots=True)
class Identity:
    """The person a request is served, queued, counted and shown under."""

    user: str
    role: str  # "user", "gateway" or "admin" for keys; "open" or "shared" without
    key_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class MissingKey(Unauthorized):
    description = "an API key is required: send Authorization: Bearer <key> or X-API-Key"


class BadKey(Unauthorized):
    description = "invalid, revoked or expired API key"


class NeedsAdmin(Forbidden):
    description = "this call manages models or the queue: it needs an admin key"


class Blocked(Forbidden):
    """The resolved user is blocked by an operator: every key and name of theirs."""

    def __init__(self, user: str) -> None:
        super().__init__(f"user '{user}' is blocked by an operator")


class TooManyBadKeys(TooManyRequests):
    """A client address that keeps sending wrong keys waits, like a wrong admin password."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many requests with a wrong API key; try again later")
        self.retry_after = retry_after  # errors.py sends it as Retry-After


def init_identity(app: Flask) -> KeyRing:
    """The app's key ring, and the hook that identifies every proxied request."""
    ring = KeyRing(app)
    app.extensions[RING_KEY] = ring
    app.extensions[NETWORKS_KEY] = NetworkRules(app.config["ALLOW_CIDRS"])
    app.before_request(_identify)
    return ring


def current() -> Identity:
    """This request's identity, resolved on first use."""
    identity = request.environ.get(ENVIRON_KEY)
    if identity is None:
        identity = request.environ[ENVIRON_KEY] = resolve()
    return identity


def user_of() -> str:
    """The user this request belongs to."""
    return current().user


def seen_user() -> str:
    """The user if this request was identified (refused ones were not), else its address."""
    identity = request.environ.get(ENVIRON_KEY)
    return identity.user if identity is not None else client_address()


def resolve() -> Identity:
    """The identity the request's credentials prove (raises 401 when they prove none)."""
    token = credential()
    if token is not None and token.startswith(KEY_PREFIX):
        entry = keys().find(token)
        if entry is None:
            raise _refused(BadKey())
        return _of_key(entry)
    shared = current_app.config["API_KEYS"]
    if shared:
        if token is None:
            raise _refused(MissingKey())
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in shared):
            raise _refused(BadKey())
        return Identity(_claimed_user(None), "shared")
    if keys().enforced:
        raise _refused(MissingKey() if token is None else BadKey())
    return Identity(_claimed_user(token), "open")


def _of_key(entry: KeyEntry) -> Identity:
    if entry.role == "gateway":
        end_user = _header_user()
        user = f"{entry.user}:{end_user}" if end_user else entry.user
        return Identity(user, "gateway", entry.id)
    return Identity(entry.user, entry.role, entry.id)


def _header_user() -> str:
    return request.headers.get("X-User-ID", "").strip()[: current_app.config["USER_ID_MAX_LENGTH"]]


def _claimed_user(token: str | None) -> str:
    """Without per-user keys: what the client says, else its key's fingerprint, else address."""
    user = _header_user()
    if user:
        return user
    if token:
        return "key-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    return client_address()


def _refused(exc: Unauthorized) -> Exception:
    """Count a failed key per client address; past the limit, a 429 instead of the 401."""
    limit = parse(current_app.config["KEY_FAILURE_LIMIT"])
    if limiter.limiter.hit(limit, "bad-key", client_address()):
        log.info("refused key from %s: %s", client_address(), exc.description)
        return exc
    reset, _ = limiter.limiter.get_window_stats(limit, "bad-key", client_address())
    return TooManyBadKeys(max(1, int(reset - time.time()) + 1))


def _identify() -> None:
    """Before every proxied request: address rules, the role, identity, blocks."""
    if request.blueprint not in GUARDED or request.path in OPEN_PATHS:
        return
    current_app.extensions[NETWORKS_KEY].check(client_address())
    if keys().enforced and _is_admin_only():
        if not holds_admin_credential():  # an admin key, or the admin password
            raise NeedsAdmin()
        request.environ[ENVIRON_KEY] = Identity("admin", "admin")
        return
    identity = current()
    if dispatcher().is_blocked(identity.user):
        raise Blocked(identity.user)


def _is_admin_only() -> bool:
    method, path = request.method, request.path
    return any(method == m and path.startswith(p) for m, p in ADMIN_ONLY)
