"""Fixtures: a fake Ollama on loopback, the app wired to it, and the app served for real."""

from gevent import monkey

monkey.patch_all()  # before anything else imports socket or ssl

import contextlib  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from ollamamq import create_app, start_services  # noqa: E402
from ollamamq.app import stop_services  # noqa: E402
from ollamamq.dispatcher import Dispatcher  # noqa: E402
from ollamamq.wsgi_handler import Handler  # noqa: E402
from tests.fake_ollama import FakeOllama  # noqa: E402

WAIT_LIMIT = 10  # seconds any test may wait for an event before failing


def settings(backend_urls: list[str], **overrides) -> dict:
    """Test settings: no log file, checks only when asked, explicit limiter storage."""
    return {
        "TESTING": True,
        "OLLAMA_URLS": backend_urls,
        "LOG_FILE": "",
        "HEALTH_INTERVAL": 3600,
        "TIMEOUT": 10,
        "RATELIMIT_STORAGE_URI": "memory://",
        "SQLALCHEMY_DATABASE_URI": "sqlite://",  # in memory, one per app
        **overrides,
    }


@contextlib.contextmanager
def served(app: Flask) -> Iterator[str]:
    """Serve `app` on a free loopback port with the production handler; yields its URL."""
    start_services(app)
    app.extensions["ollamamq"].pool.check_all()
    server = WSGIServer(("127.0.0.1", 0), app, handler_class=Handler, log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)
        stop_services(app)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as backend:
        yield backend


@pytest.fixture
def config() -> dict:
    """Per-test setting overrides: parametrize `config` to change them."""
    return {}


@pytest.fixture
def app(fake: FakeOllama, config: dict, tmp_path) -> Flask:
    database = f"sqlite:///{tmp_path / 'ollamamq.db'}"
    return create_app(settings([fake.url], SQLALCHEMY_DATABASE_URI=database, **config))


@pytest.fixture
def proxy(app: Flask) -> Iterator[str]:
    with served(app) as url:
        yield url


class Calls:
    """Counts calls to the dispatcher's methods so tests wait on events, never on sleeps."""

    def __init__(self, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = Event()
        for name in ("submit", "abandon", "release"):
            monkeypatch.setattr(dispatcher, name, self._wrap(name, getattr(dispatcher, name)))

    def _wrap(self, name, method):
        def counted(*args, **kwargs):
            result = method(*args, **kwargs)
            self.counts[name] += 1
            self._changed.set()
            return result

        return counted

    def wait_for(self, name: str, count: int) -> None:
        """Block until `name` has been called `count` times in all."""
        wait_until(self._changed, lambda: self.counts[name] >= count, f"{count} {name}")


def wait_until(changed: Event, is_done, what: str) -> None:
    """Wait for `is_done()`, re-checking each time `changed` is set; fail after WAIT_LIMIT."""
    with gevent.Timeout(WAIT_LIMIT, False):
        while not is_done():
            changed.clear()
            changed.wait()
    assert is_done(), f"gave up waiting for {what}"


def wait_arrivals(fake: FakeOllama, path: str, count: int) -> None:
    """Wait until the backend has received `count` requests for `path`."""
    arrived = Event()
    fake.on_request = lambda _: arrived.set()
    try:
        wait_until(arrived, lambda: sum(r.path == path for r in fake.received) >= count, path)
    finally:
        fake.on_request = None


@pytest.fixture
def calls(app: Flask, monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(app.extensions["ollamamq"], monkeypatch)
