"""The application factory: it only wires settings, services and blueprints together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import errors, openai_api, proxy
from .backends import BackendPool
from .config import Config
from .dispatcher import Dispatcher
from .fairshare import FairQueue

ROOT = Path(__file__).resolve().parent.parent  # templates/, static/, migrations/ live here


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """A configured app; background services start with start_services()."""
    app = Flask(__name__, template_folder=ROOT / "templates", static_folder=ROOT / "static")
    app.config.from_object(Config)
    app.config.update(overrides or {})
    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)  # type: ignore[method-assign]
    errors.register(app)
    app.extensions["ollamamq"] = _dispatcher(app)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(openai_api.bp)
    return app


def _dispatcher(app: Flask) -> Dispatcher:
    config = app.config
    pool = BackendPool(config["OLLAMA_URLS"], config["BACKEND_PARALLEL"], config["HEALTH_INTERVAL"])
    queue = FairQueue("requests")
    return Dispatcher(pool, queue, config["MAX_QUEUE"], config["MAX_QUEUE_PER_USER"])


def start_services(app: Flask) -> None:
    """Start the dispatcher and the health checks (in the serving process, after any fork)."""
    dispatcher: Dispatcher = app.extensions["ollamamq"]
    dispatcher.start()
    dispatcher.pool.start(on_change=dispatcher.wake)


def stop_services(app: Flask) -> None:
    """Stop what start_services() started."""
    dispatcher: Dispatcher = app.extensions["ollamamq"]
    dispatcher.pool.stop()
    dispatcher.stop()
