"""The application factory: it only wires settings, services and blueprints together."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import flask_migrate
import redis
from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from sqlalchemy import event
from sqlalchemy.engine import Engine
from werkzeug.middleware.proxy_fix import ProxyFix

from . import (
    accesslog,
    admin,
    admin_api,
    downloads,
    errors,
    openai_api,
    paths,
    prometheus,
    proxy,
)
from .auth import init_auth
from .backends import BackendPool
from .budgets import init_budgets
from .cluster import SharedDispatcher, default_replica_id
from .config import Config
from .dispatcher import Dispatcher
from .extensions import db, init_limiter, migrate
from .fairshare import FairQueue
from .identity import init_identity
from .jobs import SchedulerKeeper, catch_up, init_scheduler
from .keys import RING_KEY
from .ledger import Ledger
from .payloads import SafeJSONProvider
from .pulls import PullService
from .users import UserSettings

ROOT = Path(__file__).resolve().parent.parent  # templates/, static/, migrations/ live here
MIGRATIONS = str(ROOT / "migrations")
MIGRATE_LOCK_S = 60.0  # longest a replica may take to bring the schema up to date


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """A configured app; background services start with start_services()."""
    app = SyncFlask(__name__, template_folder=ROOT / "templates", static_folder=ROOT / "static")
    app.session_interface = CookieSessionOnDemand()
    app.json = SafeJSONProvider(app)
    app.config.from_object(Config)
    app.config.update(overrides or {})
    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)  # type: ignore[method-assign]
    if not app.config["RATELIMIT_STORAGE_URI"]:  # request rates are shared with the queue
        app.config["RATELIMIT_STORAGE_URI"] = app.config["REDIS_URL"] or "memory://"
    errors.register(app)
    paths.init_app(app)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS)
    init_limiter(app)
    init_auth(app)
    dispatcher = _dispatcher(app)
    pulls = PullService(app, dispatcher.pool)
    app.extensions["ollamamq"] = dispatcher
    app.extensions["ollamamq.pulls"] = pulls
    shared = dispatcher.ledger.redis if isinstance(dispatcher, SharedDispatcher) else None
    budgets = init_budgets(app, shared)
    app.extensions["ollamamq.users"] = UserSettings(dispatcher, budgets, app.config["USERS"])
    app.extensions["ollamamq.scheduler"] = scheduler = init_scheduler(app, pulls)
    app.extensions["ollamamq.scheduler_keeper"] = SchedulerKeeper(scheduler)
    app.register_blueprint(downloads.bp)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(admin_api.bp)
    accesslog.init_app(app, on_finish=[prometheus.init_app(app).observe, budgets.spend])
    init_identity(app)  # after the access log's hook: a refused request is logged too
    if isinstance(dispatcher, SharedDispatcher):
        _share_changes(app, dispatcher)
    return app


def _share_changes(app: Flask, dispatcher: SharedDispatcher) -> None:
    """A user blocked, a key revoked or a download cancelled on one replica applies on all,
    through Redis."""
    users, ring = app.extensions["ollamamq.users"], app.extensions[RING_KEY]
    pulls = app.extensions["ollamamq.pulls"]

    def in_context(reload: Callable[[], None]) -> Callable[[], None]:
        def reload_in_context() -> None:
            with app.app_context():
                reload()
                db.session.remove()

        return reload_in_context

    notices = dispatcher.notices
    notices.on_change("users", in_context(users.load))
    notices.on_change("keys", ring.reload)
    notices.on_change("downloads", in_context(pulls.abort_cancelled))
    users.announce = functools.partial(notices.announce, "users")
    ring.announce = functools.partial(notices.announce, "keys")
    pulls.announce = functools.partial(notices.announce, "downloads")


class SyncFlask(Flask):
    """Flask, for an app whose views and hooks are all plain functions (gevent, not asyncio).

    Flask asks inspect.iscoroutinefunction of every view and hook it calls, a dozen
    times per request; here the answer is always no.
    """

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        return func


class CookieSessionOnDemand(SecureCookieSessionInterface):
    """Flask's cookie session, but no signer is built for requests without the cookie.

    Flask opens a session for every request; building the signer costs ~20 µs, on every
    proxied call, which never carries the admin's cookie. Same sessions otherwise.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def _dispatcher(app: Flask) -> Dispatcher:
    config = app.config
    pool = BackendPool(config["OLLAMA_URLS"], config["BACKEND_PARALLEL"], config["HEALTH_INTERVAL"])
    limits = (config["MAX_QUEUE"], config["MAX_QUEUE_PER_USER"])
    new_queue = functools.partial(FairQueue, config["FAIRNESS"], config["OUTPUT_WEIGHT"])
    if not config["REDIS_URL"]:
        return Dispatcher(pool, new_queue(), *limits)
    replica = config["REPLICA_ID"] or default_replica_id()
    ledger = Ledger(config["REDIS_URL"])
    return SharedDispatcher(pool, new_queue(), *limits, ledger, replica, new_queue)


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets the admin read while a download writes; wait on locks instead of failing."""
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA busy_timeout=5000")


def start_services(app: Flask) -> None:
    """Bring the schema up to date, recover downloads, start the dispatcher, checks, schedule.

    Call it in the serving process (after any fork).
    """
    dispatcher: Dispatcher = app.extensions["ollamamq"]
    with app.app_context():
        if app.config["APPLY_MIGRATIONS"]:
            with _one_at_a_time(dispatcher):
                flask_migrate.upgrade(directory=MIGRATIONS)
        if _serves_alone(dispatcher):  # else the downloads marked running are others'
            app.extensions["ollamamq.pulls"].recover()
        app.extensions["ollamamq.budgets"].load()
        app.extensions["ollamamq.networks"].load()
        app.extensions["ollamamq.users"].load()
    app.extensions["ollamamq.keys"].start()
    app.extensions["ollamamq.budgets"].start()
    _start_dispatcher(dispatcher)
    dispatcher.pool.start(on_change=dispatcher.wake)
    app.extensions["ollamamq.scheduler_keeper"].start()
    catch_up(app, app.extensions["ollamamq.pulls"], datetime.now(UTC))


@contextlib.contextmanager
def _one_at_a_time(dispatcher: Dispatcher) -> Iterator[None]:
    """Replicas (gunicorn's workers) starting together migrate the schema one by one."""
    if not isinstance(dispatcher, SharedDispatcher):
        yield
        return
    lock = dispatcher.ledger.lock("migrate", MIGRATE_LOCK_S)
    try:
        held = lock.acquire()  # False after MIGRATE_LOCK_S: its holder is stuck, go on
    except redis.RedisError as exc:
        raise _unreachable(dispatcher, exc) from exc
    try:
        yield
    finally:
        if held:
            with contextlib.suppress(redis.RedisError):
                lock.release()


def _serves_alone(dispatcher: Dispatcher) -> bool:
    """No other replica is alive (or there are no replicas)."""
    if not isinstance(dispatcher, SharedDispatcher):
        return True
    try:
        return not set(dispatcher.ledger.replicas()) - {dispatcher.replica}
    except redis.RedisError as exc:
        raise _unreachable(dispatcher, exc) from exc


def _start_dispatcher(dispatcher: Dispatcher) -> None:
    try:
        dispatcher.start()
    except redis.RedisError as exc:
        raise _unreachable(dispatcher, exc) from exc


def _unreachable(dispatcher: Dispatcher, error: Exception) -> SharedQueueUnreachable:
    url = dispatcher.ledger.url if isinstance(dispatcher, SharedDispatcher) else "?"
    return SharedQueueUnreachable(f"cannot reach Redis at {url} (REDIS_URL): {error}")


class SharedQueueUnreachable(RuntimeError):
    """REDIS_URL is set but Redis does not answer: refusing to start a replica alone."""


def stop_services(app: Flask) -> None:
    """Stop what start_services() started: schedule, keys, budgets, downloads, checks, ..."""
    app.extensions["ollamamq.scheduler_keeper"].stop()
    app.extensions["ollamamq.keys"].stop()
    app.extensions["ollamamq.budgets"].stop()
    dispatcher: Dispatcher = app.extensions["ollamamq"]
    with app.app_context():
        app.extensions["ollamamq.pulls"].stop()
        dispatcher.pool.stop()
        dispatcher.stop()
        db.engine.dispose()
