"""What resolving a request's identity costs, keys off (X-User-ID) and on (a Bearer key).

    python -m bench.identity_bench

In-process, no server: the seam runs once per proxied request, so its cost is the hot
path's share of identity. Best of 5 rounds of 20,000 calls.
"""

from __future__ import annotations

import time

import flask_migrate

from ollamamq import create_app
from ollamamq.app import MIGRATIONS
from ollamamq.identity import resolve

ROUNDS, CALLS = 5, 20_000
SETTINGS = {
    "TESTING": True,
    "OLLAMA_URLS": ["http://127.0.0.1:9"],
    "LOG_FILE": "",
    "RATELIMIT_STORAGE_URI": "memory://",
    "SQLALCHEMY_DATABASE_URI": "sqlite://",
}


def per_call_us(app, headers: dict[str, str]) -> float:
    best = float("inf")
    with app.test_request_context("/api/chat", method="POST", headers=headers):
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(CALLS):
                resolve()
            best = min(best, (time.perf_counter() - started) / CALLS)
    return best * 1e6


def main() -> None:
    app = create_app(SETTINGS)
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS)
        app.extensions["ollamamq.keys"].reload()
    off = per_call_us(app, {"X-User-ID": "ana"})
    with app.app_context():
        key = app.extensions["ollamamq.keys"].create("ana")[0]
    on = per_call_us(app, {"Authorization": f"Bearer {key}", "X-User-ID": "ana"})
    print(f"identity per request: keys off {off:.2f} us, keys on {on:.2f} us")


if __name__ == "__main__":
    main()
