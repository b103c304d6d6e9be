"""Every setting, read from the environment with its default; command-line flags override."""

from __future__ import annotations

import os
import tomllib
from typing import Any


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment."""
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    """A number setting from the environment."""
    return float(os.environ.get(name, default))


def env_bool(name: str, default: bool) -> bool:
    """A yes/no setting from the environment ("1", "true", "yes", "on" mean yes)."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def split_urls(value: str | list[str]) -> list[str]:
    """Backend URLs from a comma list or repeated flags, without trailing slashes."""
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    return [p.strip().rstrip("/") for p in parts if p.strip()]


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file: keys are the settings' names in any case, plus [users.NAME].

    `ollama_url` may be a list or a comma list; `[users.NAME]` tables hold weight, vip, blocked.
    """
    with open(path, "rb") as file:
        raw = tomllib.load(file)
    settings = {
        key.upper(): value for key, value in raw.items() if key not in ("ollama_url", "users")
    }
    if "ollama_url" in raw:
        settings["OLLAMA_URLS"] = split_urls(raw["ollama_url"])
    if "users" in raw:
        settings["USERS"] = raw["users"]
    return settings


class Config:
    """Defaults for the Flask app; `create_app(overrides)` replaces any of them."""

    HOST = os.environ.get("HOST", "127.0.0.1")  # address to listen on
    PORT = env_int("PORT", 11435)  # port to listen on
    OLLAMA_URLS = split_urls(os.environ.get("OLLAMA_URL", "http://localhost:11434"))  # backends
    BACKEND_PARALLEL = env_int("BACKEND_PARALLEL", 1)  # slots per backend (OLLAMA_NUM_PARALLEL)
    TIMEOUT = env_float("TIMEOUT", 300.0)  # seconds a backend may stay silent
    CONNECT_TIMEOUT = env_float("CONNECT_TIMEOUT", 5.0)  # seconds to open a backend connection
    HEALTH_INTERVAL = env_float("HEALTH_INTERVAL", 10.0)  # seconds between backend health checks
    MAX_CONTENT_LENGTH = env_int("MAX_BODY", 64 * 1024 * 1024)  # largest queued request body
    MAX_QUEUE_PER_USER = env_int("MAX_QUEUE_PER_USER", 100)  # waiting requests per user
    MAX_QUEUE = env_int("MAX_QUEUE", 10_000)  # waiting requests in all
    USER_ID_MAX_LENGTH = 128  # longer X-User-ID values are cut
    FAIRNESS = os.environ.get("FAIRNESS", "tokens")  # "tokens" (VTC) or "requests" (round-robin)
    OUTPUT_WEIGHT = env_float("OUTPUT_WEIGHT", 2.0)  # an output token costs this many input ones
    BUSY_RETRY_S = env_float("BUSY_RETRY_S", 1.0)  # a backend answering 503 rests this long
    DRAIN_TIMEOUT = env_float("DRAIN_TIMEOUT", 60.0)  # seconds streams may run on after SIGTERM
    USERS: dict[str, dict] = {}  # per-user weight / vip / blocked, from the config file
    TRUSTED_PROXIES = env_int("TRUSTED_PROXIES", 0)  # proxy hops allowed to set X-Forwarded-For
    API_KEYS = split_urls(os.environ.get("API_KEY", ""))  # shared keys (ollamaMQ's --api-key)
    KEY_FAILURE_LIMIT = os.environ.get("KEY_FAILURE_LIMIT", "20 per minute")  # bad keys per IP
    DEFAULT_REQUESTS_PER_MINUTE = env_int("DEFAULT_REQUESTS_PER_MINUTE", 0) or None  # per user
    DEFAULT_TOKENS_PER_DAY = env_float("DEFAULT_TOKENS_PER_DAY", 0) or None  # weighted, per user
    DEFAULT_TOKENS_PER_MONTH = env_float("DEFAULT_TOKENS_PER_MONTH", 0) or None  # unset: unlimited
    ALLOW_CIDRS = split_urls(os.environ.get("ALLOW_CIDR", ""))  # networks allowed; none: all
    LOG_FILE = os.environ.get("LOG_FILE", "ollamamq.log")  # "" logs to stderr only
    LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")
    LOG_FORMAT = os.environ.get("LOG_FORMAT", "text")  # "text" or "json" (one object per line)
    METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")  # bearer token a scraper may send
    METRICS_PER_USER = env_bool("METRICS_PER_USER", False)  # user= labels (users are unbounded)
    REDIS_URL = os.environ.get("REDIS_URL", "")  # "": one process; else replicas share a queue
    REPLICA_ID = os.environ.get("REPLICA_ID", "")  # "": host name and process id
    RATELIMIT_STORAGE_URI = os.environ.get("RATELIMIT_STORAGE_URI", "")  # "": memory or REDIS_URL
    RATELIMIT_HEADERS_ENABLED = True  # X-RateLimit-* and Retry-After on limited answers

    # The download queue (ohhhllama's names where it has them).
    SQLALCHEMY_DATABASE_URI = os.environ.get(
        "DATABASE_URL", "sqlite:///" + os.path.abspath(os.environ.get("DB_PATH", "ollamamq.db"))
    )
    RATE_LIMIT = env_int("RATE_LIMIT", 5)  # new download jobs per client address per day
    QUEUE_SCHEDULE = os.environ.get("QUEUE_SCHEDULE", "0 3 * * *")  # cron: when downloads run
    QUEUE_TIMEZONE = os.environ.get("QUEUE_TIMEZONE") or None  # None: the server's local zone
    QUEUE_WINDOW_MINUTES = env_int("QUEUE_WINDOW_MINUTES", 0)  # 0: no closing time
    QUEUE_CATCH_UP_HOURS = env_float("QUEUE_CATCH_UP_HOURS", 6.0)  # open a missed window this late
    DOWNLOAD_CONCURRENCY = env_int("DOWNLOAD_CONCURRENCY", 1)  # pulls running at once
    PULL_ATTEMPTS = env_int("PULL_ATTEMPTS", 3)  # tries before a job is marked failed
    PULL_RETRY_DELAY = env_float("PULL_RETRY_DELAY", 30.0)  # seconds, doubled each retry
    CLEANUP_DAYS = env_int("CLEANUP_DAYS", 30)  # finished jobs are kept this long
    SHOW_QUEUED_IN_TAGS = env_bool("SHOW_QUEUED_IN_TAGS", False)  # list queued models in tags
    DISK_PATH = os.environ.get("DISK_PATH", "")  # models disk to guard; "" for no guard
    DISK_THRESHOLD = env_float("DISK_THRESHOLD", 90.0)  # percent used above which pulls get 507
    APPLY_MIGRATIONS = True  # bring the database schema up to date when the server starts

    # The admin.
    ADMIN_PASSWORD = os.environ.get("OLLAMAMQ_ADMIN_PASSWORD", "")  # "" : loopback only
    SECRET_KEY = os.environ.get("SECRET_KEY") or os.urandom(32).hex()  # signs admin sessions
    ADMIN_LOGIN_LIMIT = os.environ.get("ADMIN_LOGIN_LIMIT", "5 per minute")  # wrong passwords/IP
    SESSION_COOKIE_NAME = "ollamamq_admin"
    SESSION_COOKIE_HTTPONLY = True  # scripts in the page never see the session
    SESSION_COOKIE_SAMESITE = "Lax"  # other sites' forms and scripts never carry the session
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)  # True behind HTTPS
    WTF_CSRF_CHECK_DEFAULT = False  # CSRF is checked on admin POSTs only, never on the proxy
    WTF_CSRF_TIME_LIMIT = None  # a token lives as long as its session: dashboards stay open
