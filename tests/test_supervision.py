"""No greenlet dies silently: a crash is logged, the loop restarts, /health says degraded."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import gevent
import requests
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from gevent.event import Event
from sqlalchemy import select

from ollamamq.extensions import db
from ollamamq.jobs import DOWNLOADS_JOB
from ollamamq.models import PENDING, PullJob
from tests.conftest import WAIT_LIMIT, served, wait_arrivals
from tests.fake_ollama import model_entry, payload

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


class Injected(RuntimeError):
    """The exception a test throws into a loop."""


def loop_of(owner, name: str) -> gevent.Greenlet:
    """The owner's running loop greenlet called `name`."""
    (greenlet,) = [g for g in owner.greenlets.group if g.name.endswith(name) and not g.dead]
    return greenlet


def hold(monkeypatch, target, method: str) -> tuple[Event, Event]:
    """Make target.method block at its next call until `resume`; `reached` says it was called."""
    reached, resume = Event(), Event()
    original = getattr(target, method)

    def held(*args, **kwargs):
        reached.set()
        resume.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, method, held)
    return reached, resume


def crash(owner, name: str, reached: Event) -> None:
    """Throw an exception into a loop and wait until its restart reaches the held call."""
    loop_of(owner, name).kill(Injected("injected"), block=False)
    assert reached.wait(WAIT_LIMIT), f"{name} was not restarted"


def health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json()


def assert_logged_with_traceback(caplog, words: str) -> None:
    crashes = [r for r in caplog.records if words in r.getMessage() and r.exc_info]
    assert crashes and crashes[0].exc_info[0] is Injected


def test_a_crashed_dispatcher_restarts_and_health_says_degraded_meanwhile(
    proxy, app, monkeypatch, caplog
):
    caplog.set_level(logging.ERROR, "ollamamq.supervisor")
    dispatcher = app.extensions["ollamamq"]
    reached, resume = hold(monkeypatch, dispatcher, "_grant_all")
    crash(dispatcher, "dispatcher loop", reached)
    down = health(proxy)
    assert down["status"] == "degraded"
    assert "dispatcher loop crashed (Injected('injected'))" in down["problems"][0]
    assert_logged_with_traceback(caplog, "dispatcher loop crashed")
    resume.set()
    assert requests.post(f"{proxy}/api/chat", json=CHAT, timeout=10).status_code == 200
    assert health(proxy)["status"] == "ok" and health(proxy)["problems"] == []


def test_a_crashed_health_loop_restarts(proxy, app, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, "ollamamq.supervisor")
    pool = app.extensions["ollamamq"].pool
    reached, resume = hold(monkeypatch, pool, "check_all")
    crash(pool, "health loop", reached)
    problems = health(proxy)["problems"]
    assert health(proxy)["status"] == "degraded"
    assert "backend pool: health loop crashed" in problems[0]
    assert_logged_with_traceback(caplog, "health loop crashed")
    resume.set()
    recovered = Event()
    monkeypatch.setattr(pool.greenlets, "recovered", _then_set(pool.greenlets.recovered, recovered))
    assert recovered.wait(WAIT_LIMIT)
    assert health(proxy)["status"] == "ok"


def test_a_crashing_catalog_refresh_is_shown_until_one_succeeds(proxy, app, fake, monkeypatch):
    (backend,) = app.extensions["ollamamq"].pool.backends
    broken = backend.refresh_models
    monkeypatch.setattr(backend, "refresh_models", _raising)
    missing = requests.post(f"{proxy}/api/chat", json={**CHAT, "model": "new"}, timeout=10)
    assert missing.status_code == 404
    assert "catalog" in health(proxy)["problems"][0]
    monkeypatch.setattr(backend, "refresh_models", broken)
    fake.models["new:latest"] = model_entry("new:latest")  # added behind the proxy's back
    assert requests.post(f"{proxy}/api/chat", json={**CHAT, "model": "new"}).status_code == 200
    assert health(proxy)["status"] == "ok"


def test_a_crashed_download_runner_restarts_and_loses_no_job(proxy, app, fake, monkeypatch):
    service = app.extensions["ollamamq.pulls"]
    fake.pull_gate = Event()  # the first pull stalls after its first progress record
    for model in ("mistral", "phi3"):
        requests.post(f"{proxy}/api/pull", json={"model": model, "stream": False}, timeout=10)
    requests.post(f"{proxy}/api/queue/process", json={}, timeout=10)
    wait_arrivals(fake, "/api/pull", 1)  # the runner has claimed mistral and waits on it
    reached, resume = hold(monkeypatch, service, "_claim_next")
    crash(service, "runner", reached)
    assert "downloads: runner crashed" in health(proxy)["problems"][0]
    resume.set()
    fake.pull_gate.set()
    assert service.greenlets.group.join(timeout=WAIT_LIMIT)  # runner and pulls all done
    pulled = [payload(r)["model"] for r in fake.received if r.path == "/api/pull"]
    assert sorted(pulled) == ["mistral:latest", "phi3:latest"]
    assert health(proxy)["problems"] == []


def test_a_crashed_scheduler_loop_restarts(proxy, app, monkeypatch, caplog):
    caplog.set_level(logging.ERROR, "ollamamq.supervisor")
    keeper = app.extensions["ollamamq.scheduler_keeper"]
    restarted = Event()
    monkeypatch.setattr(
        keeper.greenlets, "recovered", _then_set(keeper.greenlets.recovered, restarted)
    )
    first = keeper.main_loop
    first.kill(Injected("injected"), block=False)
    assert restarted.wait(WAIT_LIMIT)
    assert keeper.main_loop is not first and app.extensions["ollamamq.scheduler"].running
    assert_logged_with_traceback(caplog, "main loop crashed")
    assert health(proxy)["problems"] == []


def test_a_failing_scheduled_job_is_shown_until_it_succeeds(proxy, app, monkeypatch):
    service = app.extensions["ollamamq.pulls"]
    monkeypatch.setattr(service, "open_window", _raising)
    scheduler = app.extensions["ollamamq.scheduler"]
    ended = Event()
    scheduler.add_listener(lambda _: ended.set(), EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
    run_now(scheduler)
    assert ended.wait(WAIT_LIMIT)
    assert "scheduled job process-downloads failed: Injected" in health(proxy)["problems"][0]
    monkeypatch.undo()
    ended.clear()
    run_now(scheduler)
    assert ended.wait(WAIT_LIMIT)
    assert health(proxy)["problems"] == []


def run_now(scheduler) -> None:
    """Make the download window's job due now, through the scheduler's public API."""
    scheduler.modify_job(DOWNLOADS_JOB, next_run_time=datetime.now(UTC))
    scheduler.scheduler.wakeup()


def test_stop_services_stops_everything_and_downloads_stay_pending(app, fake):
    fake.pull_gate = Event()
    service = app.extensions["ollamamq.pulls"]
    with served(app) as url:
        requests.post(f"{url}/api/pull", json={"model": "mistral", "stream": False}, timeout=10)
        requests.post(f"{url}/api/queue/process", json={}, timeout=10)
        wait_arrivals(fake, "/api/pull", 1)
    fake.pull_gate.set()
    dispatcher = app.extensions["ollamamq"]
    owners = (dispatcher, dispatcher.pool, service, app.extensions["ollamamq.scheduler_keeper"])
    assert all(len(owner.greenlets.group) == 0 for owner in owners)
    assert not app.extensions["ollamamq.scheduler"].running
    with app.app_context():
        assert [j.status for j in db.session.scalars(select(PullJob))] == [PENDING]


def _raising(*_args, **_kwargs):
    raise Injected("injected")


def _then_set(method, event: Event):
    def wrapped(*args, **kwargs):
        result = method(*args, **kwargs)
        event.set()
        return result

    return wrapped
