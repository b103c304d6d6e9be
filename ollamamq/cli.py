"""The `ollamamq` command: serve the proxy with gevent's WSGI server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from logging.handlers import WatchedFileHandler
from typing import Any

import flask_migrate
import gevent
from flask import Flask
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from . import audit
from .app import (
    MIGRATIONS,
    SharedQueueUnreachable,
    create_app,
    start_services,
    stop_services,
)
from .config import load_config_file, split_urls
from .models import ROLES
from .shutdown import Drain
from .wsgi_handler import Handler, QuietHandler

log = logging.getLogger(__name__)

BACKLOG = 4096  # thousands of clients may connect at once and wait in the queue


def build_parser(version: str) -> argparse.ArgumentParser:
    """Flags named as in ollamaMQ; each one overrides its environment variable."""
    p = argparse.ArgumentParser(prog="ollamamq", description="Fair-queueing proxy for Ollama.")
    p.add_argument("-p", "--port", type=int, dest="PORT", help="port to listen on (PORT, 11435)")
    p.add_argument("-H", "--host", dest="HOST", help="address to listen on (HOST, 127.0.0.1)")
    p.add_argument(
        "-o",
        "--ollama-url",
        action="append",
        dest="OLLAMA_URLS",
        metavar="URL",
        help="backend URL; repeat or comma-separate for several; URL#N gives N slots "
        "(OLLAMA_URL, http://localhost:11434)",
    )
    p.add_argument(
        "-t",
        "--timeout",
        type=float,
        dest="TIMEOUT",
        help="seconds a backend may stay silent (TIMEOUT, 300)",
    )
    p.add_argument(
        "--backend-parallel",
        type=int,
        dest="BACKEND_PARALLEL",
        metavar="N",
        help="slots per backend, as OLLAMA_NUM_PARALLEL (BACKEND_PARALLEL, 1)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        dest="MAX_CONTENT_LENGTH",
        metavar="BYTES",
        help="largest queued request body (MAX_BODY, 64 MiB)",
    )
    p.add_argument(
        "--max-queue-per-user",
        type=int,
        dest="MAX_QUEUE_PER_USER",
        metavar="N",
        help="waiting requests per user before 429 (MAX_QUEUE_PER_USER, 100)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        dest="MAX_QUEUE",
        metavar="N",
        help="waiting requests in all before 503 (MAX_QUEUE, 10000)",
    )
    p.add_argument(
        "--trusted-proxies",
        type=int,
        dest="TRUSTED_PROXIES",
        metavar="N",
        help="proxy hops trusted to set X-Forwarded-For (TRUSTED_PROXIES, 0)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        dest="API_KEYS",
        metavar="KEY",
        help="a shared key every request must carry; holders name users with X-User-ID; "
        "repeat or comma-separate (API_KEY)",
    )
    p.add_argument(
        "--allow-cidr",
        action="append",
        dest="ALLOW_CIDRS",
        metavar="CIDR",
        help="only clients in this network may use the proxy; repeat for several (ALLOW_CIDR)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        dest="HEALTH_INTERVAL",
        metavar="SECONDS",
        help="seconds between backend health checks (HEALTH_INTERVAL, 10)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        dest="DRAIN_TIMEOUT",
        metavar="S",
        help="seconds streams may run on after SIGTERM (DRAIN_TIMEOUT, 60)",
    )
    p.add_argument("--log-file", dest="LOG_FILE", help="log file, '' for none (LOG_FILE)")
    p.add_argument("--log-level", dest="LOG_LEVEL", help="DEBUG, INFO, WARNING (LOG_LEVEL)")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        dest="LOG_FORMAT",
        help="text, or json: one object per line (LOG_FORMAT, text)",
    )
    p.add_argument(
        "--metrics-per-user",
        action="store_const",
        const=True,
        dest="METRICS_PER_USER",
        help="label /metrics request and token counts by user (METRICS_PER_USER)",
    )
    p.add_argument(
        "--fairness",
        choices=["tokens", "requests"],
        dest="FAIRNESS",
        help="share by tokens served (VTC) or by requests (FAIRNESS, tokens)",
    )
    p.add_argument(
        "--output-weight",
        type=float,
        dest="OUTPUT_WEIGHT",
        metavar="W",
        help="cost of an output token in input tokens (OUTPUT_WEIGHT, 2)",
    )
    p.add_argument(
        "-c",
        "--config",
        default=os.environ.get("OLLAMAMQ_CONFIG"),
        metavar="FILE",
        help="TOML settings file: backends, [users.NAME] weight/vip/blocked",
    )
    p.add_argument(
        "--download-concurrency",
        type=int,
        dest="DOWNLOAD_CONCURRENCY",
        metavar="N",
        help="model pulls at once in a download window (DOWNLOAD_CONCURRENCY, 1)",
    )
    p.add_argument(
        "--show-queued-in-tags",
        action="store_const",
        const=True,
        dest="SHOW_QUEUED_IN_TAGS",
        help="list queued models in /api/tags, marked queued (SHOW_QUEUED_IN_TAGS)",
    )
    p.add_argument(
        "--redis-url",
        dest="REDIS_URL",
        metavar="URL",
        help="share one fair queue with other replicas through this Redis (REDIS_URL)",
    )
    p.add_argument(
        "--replica-id",
        dest="REPLICA_ID",
        metavar="NAME",
        help="this replica's name in logs, /health and metrics (REPLICA_ID, host-pid)",
    )
    p.add_argument("--no-tui", action="store_true", help="accepted for ollamaMQ compatibility")
    p.add_argument("-V", "--version", action="version", version=f"ollamamq {version}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    downloads = commands.add_parser("downloads", help="the download queue, without a browser")
    downloads.add_argument("action", choices=["list", "process", "remove"])
    downloads.add_argument("model", nargs="?", help="the model to remove")
    keys = commands.add_parser("keys", help="per-user API keys: create, list, revoke")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="a new key for USER, printed once")
    create.add_argument("user")
    create.add_argument("--role", choices=ROLES, default="user")
    create.add_argument("--expires-days", type=float, metavar="N")
    create.add_argument("--note", default="", metavar="TEXT")
    actions.add_parser("list", help="every key: id, prefix, user, role, last use, expiry")
    revoke = actions.add_parser("revoke", help="revoke the key with this ID")
    revoke.add_argument("id", type=int)
    top = commands.add_parser("top", help="live terminal dashboard of a running proxy")
    top.add_argument("--url", default="http://127.0.0.1:11435", help="the proxy to watch")
    top.add_argument("--password", help="admin password (OLLAMAMQ_ADMIN_PASSWORD)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from the config file, then the command line, which wins."""
    given = {k: v for k, v in vars(args).items() if k.isupper() and v is not None}
    for listed in ("OLLAMA_URLS", "API_KEYS", "ALLOW_CIDRS"):
        if listed in given:
            given[listed] = split_urls(given[listed])
    from_file = load_config_file(args.config) if args.config else {}
    return {**from_file, **given}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys, for Loki or ELK.

    An access line's message is already a JSON object: its keys join the record's.
    """

    def __init__(self, replica: str = "") -> None:
        super().__init__()
        self.replica = {"replica": replica} if replica else {}

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            **self.replica,
        }
        if record.name == "ollamamq.access" and message.startswith("{"):
            entry |= json.loads(message)
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setup_logging(level: str, log_file: str, log_format: str = "text", replica: str = "") -> None:
    """Log to stderr and, unless empty, to `log_file`, reopened when logrotate moves it.

    A replica of a shared queue names itself on every line: their logs are read together.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(WatchedFileHandler(log_file))  # notices a rotated file: no SIGHUP needed
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(replica)
    else:
        named = f"[{replica.replace('%', '%%')}] " if replica else ""
        formatter = logging.Formatter(f"%(asctime)s %(levelname)s {named}%(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)


def serve(app: Flask) -> None:
    """Serve until SIGINT or SIGTERM, then drain (see shutdown.py)."""
    host, port = app.config["HOST"], app.config["PORT"]
    wsgi_log = logging.getLogger("ollamamq.wsgi")
    # None unless shown: pywsgi formats every request's line before the logger drops it.
    access = (
        LoggingLogAdapter(wsgi_log, logging.DEBUG) if wsgi_log.isEnabledFor(logging.DEBUG) else None
    )
    server = WSGIServer(
        (host, port),
        app,
        handler_class=Handler if access else QuietHandler,
        backlog=BACKLOG,
        log=access,
        error_log=LoggingLogAdapter(log, logging.ERROR),
    )
    server.start()
    try:
        start_services(app)
    except SharedQueueUnreachable as exc:
        log.error("%s", exc)
        sys.exit(1)
    log.info("listening on http://%s:%d", host, server.server_port)
    _warn_if_open(app, host)
    drain = Drain(app, finish=lambda: server.stop(timeout=1))  # keep-alive idlers: 1 s
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, drain.on_signal)
    server.serve_forever()
    stop_services(app)
    log.info("stopped")


def _warn_if_open(app: Flask, host: str) -> None:
    is_local = host in ("127.0.0.1", "::1", "localhost")
    if not is_local and not app.config["API_KEYS"] and not app.extensions["ollamamq.keys"].enforced:
        log.warning(
            "listening on %s with no API keys: anyone who reaches it may name any user "
            "(create keys with `ollamamq keys create USER`)",
            host,
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `ollamamq` and `python -m ollamamq`."""
    from . import __version__

    parser = build_parser(__version__)
    args = parser.parse_args(argv)
    if args.command == "top":  # a client of a running proxy: no app, no database
        from . import top

        sys.exit(top.main(args.url, args.password, args.interval))
    app = create_app(overrides_from(args))
    config, replica = app.config, app.extensions["ollamamq"].replica
    setup_logging(config["LOG_LEVEL"], config["LOG_FILE"], config["LOG_FORMAT"], replica)
    if args.command == "downloads":
        if args.action == "remove" and not args.model:
            parser.error("downloads remove needs a MODEL")
        sys.exit(downloads_command(app, args.action, args.model))
    if args.command == "keys":
        sys.exit(keys_command(app, args))
    serve(app)


def keys_command(app: Flask, args: argparse.Namespace) -> int:
    """Create, list or revoke API keys in the database the server uses."""
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS)
        ring = app.extensions["ollamamq.keys"]
        if args.action == "create":
            try:
                key, view = ring.create(args.user, args.role, args.expires_days, args.note)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            audit.record("create_key", view.user, f"role={view.role} id={view.id}", 201)
            print(f"key {view.id} for {view.user} ({view.role}); it is shown only this once:")
            print(key)
            return 0
        if args.action == "revoke":
            view = ring.revoke(args.id)
            audit.record("revoke_key", str(args.id), "", 200 if view else 404)
            print(f"revoked key {args.id} of {view.user}" if view else f"no key {args.id}")
            return 0 if view else 1
        for v in ring.views():
            used = v.last_used_at.isoformat(timespec="seconds") if v.last_used_at else "never"
            expires = v.expires_at.isoformat(timespec="seconds") if v.expires_at else "never"
            print(
                f"{v.id:>4}  {v.prefix}...  {v.user:<20} {v.role:<8} {v.status:<8} "
                f"used {used}  expires {expires}  {v.note}"
            )
        return 0


def downloads_command(app: Flask, action: str, model: str | None) -> int:
    """List, process or remove queued downloads in the database the server uses."""
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS)
        pulls = app.extensions["ollamamq.pulls"]
        if action == "remove":
            removed = pulls.remove_model(model)
            print(f"removed {model}" if removed else f"no pending download of {model}")
            return 0 if removed else 1
        if action == "process":
            pulls.process()
            pulls.wait()
        for job in pulls.jobs():
            print(
                f"{job.id:>5}  {job.status:<12} {job.percent:5.1f}%  {job.model}"
                f"{'  ' + job.last_error if job.last_error else ''}"
            )
        return 0
