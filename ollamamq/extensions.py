"""Flask extensions, created unbound and bound to each app by the factory."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import Flask, request
from flask_limiter import Limiter
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

# Flask-WTF: session-bound, signed CSRF tokens for the admin forms, well kept and small.
from flask_wtf.csrf import CSRFProtect
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Typed declarative base for the models."""


def client_address() -> str:
    """The client's address (behind --trusted-proxies hops, as ProxyFix resolved it)."""
    return request.remote_addr or "unknown"


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
limiter = Limiter(client_address)  # storage comes from RATELIMIT_STORAGE_URI per app
csrf = CSRFProtect()  # checks only what auth.py asks it to (WTF_CSRF_CHECK_DEFAULT off)


HOT_PATHS = ("proxy", "openai_api")  # blueprints with no limits of their own


def init_limiter(app: Flask) -> None:
    """Bind Flask-Limiter with its per-request hooks skipped on the proxy's blueprints.

    Even with every limit filtered out, its before, after and teardown hooks build a context
    per request. Proxy traffic has no route limits: budgets and bad keys call
    limiter.limiter (the storage) themselves.
    """
    lists = (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs)
    known = [list(hooks.get(None, ())) for hooks in lists]
    limiter.init_app(app)
    for hooks, old in zip(lists, known, strict=True):
        hooks[None] = [h if h in old else _off_hot_paths(h) for h in hooks.get(None, ())]


def _off_hot_paths(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def skipped_on_hot_paths(*args: Any) -> Any:
        if request.blueprint in HOT_PATHS:
            return args[0] if args else None  # an after_request hook hands the response on
        return hook(*args)

    return skipped_on_hot_paths
