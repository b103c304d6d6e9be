"""The download queue: pulls are queued, deduplicated, limited, and processed when told to."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import flask_migrate
import gevent
import httpx
import ollama
import pytest
import requests
from apscheduler.triggers.cron import CronTrigger
from gevent.event import Event

from ollamamq.app import MIGRATIONS
from ollamamq.jobs import DOWNLOADS_JOB, catch_up, missed_opening


def pull(url: str, model: str, stream: bool = False, **kwargs) -> requests.Response:
    return requests.post(
        f"{url}/api/pull", json={"model": model, "stream": stream}, timeout=10, **kwargs
    )


def pulls_seen(fake) -> list[str]:
    return [r.json["model"] for r in fake.received if r.path == "/api/pull"]


def process_now(url: str, app, **body) -> requests.Response:
    response = requests.post(f"{url}/api/queue/process", json=body, timeout=10)
    app.extensions["ollamamq.pulls"].wait()
    return response


def test_pull_is_queued_in_ollamas_format_and_nothing_is_downloaded(proxy, fake):
    client = ollama.Client(host=proxy)
    assert [r.status for r in client.pull("mistral:7b", stream=True)] == ["queued"]
    assert client.pull("phi3").status == "queued"
    again = pull(proxy, "phi3").json()
    assert again["position"] == 2 and again["scheduled_for"].endswith("Z")
    assert pulls_seen(fake) == []
    queue = requests.get(f"{proxy}/api/queue", timeout=10).json()
    assert [j["model"] for j in queue["queue"]] == ["mistral:7b", "phi3:latest"]
    assert queue["counts"] == {"pending": 2}
    client._client.close()


def test_installed_model_answers_success_and_queues_nothing(proxy):
    assert pull(proxy, "LLAMA3").json() == {"status": "success"}
    streamed = pull(proxy, "llama3", stream=True)
    assert streamed.headers["Content-Type"] == "application/x-ndjson"
    assert json.loads(streamed.text) == {"status": "success"}
    assert requests.get(f"{proxy}/api/queue", timeout=10).json()["queue"] == []


@pytest.mark.parametrize("config", [{"RATE_LIMIT": 1}])
def test_duplicate_pull_returns_the_same_job_and_costs_no_quota(proxy):
    first = pull(proxy, "mistral").json()
    again = pull(proxy, "Mistral:latest")
    assert again.status_code == 200 and again.json()["job"] == first["job"]
    assert "already in" in again.json()["message"]
    assert pull(proxy, "phi3").status_code == 429


@pytest.mark.parametrize("config", [{"RATE_LIMIT": 5}])
def test_sixth_new_model_from_one_address_is_refused_but_not_others(proxy):
    for n in range(5):
        assert pull(proxy, f"model-{n}").json()["status"] == "queued"
    refused = pull(proxy, "model-5")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "5 new models per day" in refused.json()["error"]
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:
        answer = other.post(f"{proxy}/api/pull", json={"model": "model-5", "stream": False})
    assert answer.status_code == 200 and answer.json()["status"] == "queued"


@pytest.mark.parametrize("config", [{"RATE_LIMIT": 1}])
def test_forged_forwarded_for_does_not_reset_the_quota(proxy):
    assert pull(proxy, "a").status_code == 200
    forged = pull(proxy, "b", headers={"X-Forwarded-For": "10.9.9.9"})
    assert forged.status_code == 429


@pytest.mark.parametrize("config", [{"RATE_LIMIT": 1, "TRUSTED_PROXIES": 1}])
def test_forwarded_for_counts_when_the_proxy_hop_is_trusted(proxy):
    assert pull(proxy, "a", headers={"X-Forwarded-For": "10.0.0.1"}).status_code == 200
    assert pull(proxy, "b", headers={"X-Forwarded-For": "10.0.0.1"}).status_code == 429
    assert pull(proxy, "b", headers={"X-Forwarded-For": "10.0.0.2"}).status_code == 200


def test_processing_now_downloads_and_the_model_is_then_listed(proxy, app, fake):
    job = pull(proxy, "mistral").json()["job"]
    assert process_now(proxy, app).status_code == 202
    assert pulls_seen(fake) == ["mistral:latest"]
    finished = requests.get(f"{proxy}/api/queue", timeout=10).json()["history"][0]
    assert (finished["id"], finished["status"], finished["percent"]) == (job, "completed", 100.0)
    assert finished["total_bytes"] > 0 and finished["completed_bytes"] == finished["total_bytes"]
    names = {m["model"] for m in requests.get(f"{proxy}/api/tags", timeout=10).json()["models"]}
    assert "mistral:latest" in names
    chat = {"model": "mistral", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert requests.post(f"{proxy}/api/chat", json=chat, timeout=10).status_code == 200


def test_processing_one_job_leaves_the_others_waiting(proxy, app, fake):
    first = pull(proxy, "mistral").json()["job"]
    pull(proxy, "phi3")
    process_now(proxy, app, id=first)
    assert pulls_seen(fake) == ["mistral:latest"]
    assert [j["model"] for j in requests.get(f"{proxy}/api/queue").json()["queue"]] == [
        "phi3:latest"
    ]


@pytest.mark.parametrize("config", [{"PULL_ATTEMPTS": 3, "PULL_RETRY_DELAY": 0}])
def test_failing_pull_is_retried_then_marked_failed_with_its_error(proxy, app, fake):
    fake.fail_pulls = 3
    pull(proxy, "mistral")
    process_now(proxy, app)
    assert pulls_seen(fake) == ["mistral:latest"] * 3
    failed = requests.get(f"{proxy}/api/queue", timeout=10).json()["history"][0]
    assert (failed["status"], failed["attempts"]) == ("failed", 3)
    assert "connection reset" in failed["last_error"]


@pytest.mark.parametrize("config", [{"PULL_ATTEMPTS": 3, "PULL_RETRY_DELAY": 0}])
def test_a_retry_that_succeeds_completes_the_job(proxy, app, fake):
    fake.fail_pulls = 1
    pull(proxy, "mistral")
    process_now(proxy, app)
    done = requests.get(f"{proxy}/api/queue", timeout=10).json()["history"][0]
    assert (done["status"], done["attempts"]) == ("completed", 2)
    assert "connection reset" in done["last_error"]  # kept: why the first attempt failed


def test_removing_a_queued_model(proxy):
    pull(proxy, "mistral")
    pull(proxy, "phi3")
    assert requests.delete(f"{proxy}/api/queue", json={"model": "mistral"}).status_code == 200
    assert requests.delete(f"{proxy}/api/queue", json={"model": "mistral"}).status_code == 404
    client = ollama.Client(host=proxy)
    assert client.delete("phi3").status == "success"  # only queued: taken off the queue
    assert requests.get(f"{proxy}/api/queue", timeout=10).json()["queue"] == []
    assert client.delete("llama3").status == "success"  # installed: Ollama deletes it
    client._client.close()


@pytest.mark.parametrize("config", [{"SHOW_QUEUED_IN_TAGS": True}])
def test_queued_models_can_be_listed_in_tags(proxy):
    pull(proxy, "mistral")
    models = requests.get(f"{proxy}/api/tags", timeout=10).json()["models"]
    queued = [m for m in models if m.get("status") == "queued"]
    assert [m["model"] for m in queued] == ["mistral:latest"]
    assert len(models) == 4


def test_full_disk_refuses_new_downloads_with_507(proxy, app, tmp_path):
    app.config.update(DISK_PATH=str(tmp_path), DISK_THRESHOLD=0)
    refused = pull(proxy, "mistral")
    assert refused.status_code == 507 and "disk" in refused.json()["error"]
    health = requests.get(f"{proxy}/health", timeout=10).json()
    assert health["disk"]["accepting_downloads"] is False
    assert health["database"] == "ok" and health["scheduler"]["running"] is True


def test_inside_the_window_a_pull_streams_real_progress(proxy, app, fake):
    app.extensions["ollamamq.pulls"].open_window(minutes=60)
    records = [json.loads(line) for line in pull(proxy, "mistral", stream=True).iter_lines()]
    assert records[0]["status"] == "pulling manifest"
    assert any(r.get("completed") == r.get("total") for r in records if "total" in r)
    assert records[-1] == {"status": "success"}
    assert pull(proxy, "phi3").json() == {"status": "success"}


def test_processing_needs_the_admin_password_when_one_is_set(fake, tmp_path):
    from ollamamq import create_app
    from tests.conftest import served, settings

    app = create_app(settings([fake.url], ADMIN_PASSWORD="s3cret"))
    with served(app) as url:
        assert requests.post(f"{url}/api/queue/process", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.post(f"{url}/api/queue/process", headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert requests.post(f"{url}/api/queue/process", headers=right).status_code == 202


@pytest.mark.parametrize("config", [{"QUEUE_TIMEZONE": "UTC"}])
def test_the_window_job_follows_the_cron_schedule(app):
    """The default schedule opens the window at 03:00 UTC: next 03:00 after any instant."""
    trigger = app.extensions["ollamamq.scheduler"].get_job(DOWNLOADS_JOB).trigger
    day = datetime(2030, 6, 15, tzinfo=UTC)  # a fixed instant: the trigger reads no clock
    assert trigger.get_next_fire_time(None, day.replace(hour=2, minute=59)) == day.replace(hour=3)
    later = trigger.get_next_fire_time(None, day.replace(hour=3, second=1))
    assert later == datetime(2030, 6, 16, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize("config", [{"QUEUE_TIMEZONE": "UTC", "QUEUE_WINDOW_MINUTES": 90}])
def test_the_running_scheduler_opens_the_window_when_its_time_comes(app, monkeypatch):
    """The real scheduler on the real clock: the job waits for the next 03:00, runs when due."""
    opened = Event()
    monkeypatch.setattr(app.extensions["ollamamq.pulls"], "open_window", lambda _: opened.set())
    with app.app_context():
        flask_migrate.upgrade(directory=MIGRATIONS)  # the window records when it opened
    scheduler = app.extensions["ollamamq.scheduler"]
    scheduler.start()
    try:
        job = scheduler.get_job(DOWNLOADS_JOB)
        now = datetime.now(UTC)
        assert now < job.next_run_time == job.trigger.get_next_fire_time(None, now)
        assert not opened.is_set()
        scheduler.modify_job(DOWNLOADS_JOB, next_run_time=datetime.now(UTC))  # its time comes
        assert opened.wait(10)
        job = scheduler.get_job(DOWNLOADS_JOB)
        assert job.next_run_time == job.trigger.get_next_fire_time(None, datetime.now(UTC))
    finally:
        scheduler.shutdown(wait=False)


def test_processing_refuses_a_plain_cross_site_form(proxy, app):
    form = requests.post(f"{proxy}/api/queue/process", data={"id": "1"}, timeout=10)
    assert form.status_code == 400 and "JSON" in form.json()["error"]


def test_dashboard_sees_the_progress_of_a_running_download(proxy, app, fake):
    from gevent.event import Event as Gate

    fake.pull_gate = Gate()  # the pull stalls after its first progress record
    pull(proxy, "mistral")
    requests.post(f"{proxy}/api/queue/process", json={}, timeout=10)
    with app.app_context():
        service = app.extensions["ollamamq.pulls"]
        wait_until_progress(service)
        (running,) = [j for j in service.jobs() if j.status == "downloading"]
    assert 0 < running.completed_bytes < running.total_bytes
    fake.pull_gate.set()
    service.wait()


def wait_until_progress(service) -> None:
    changed = Event()
    original = service._publish

    def publish(job_id, record):
        original(job_id, record)
        changed.set()

    service._publish = publish
    with gevent.Timeout(10):
        while not any(j.completed_bytes for j in service.jobs() if j.status == "downloading"):
            changed.clear()
            changed.wait()


DAY = datetime(2030, 6, 15, tzinfo=UTC)  # fixed instants: the catch-up reads only `now`


def at(hour: int, minute: int = 0) -> datetime:
    return DAY.replace(hour=hour, minute=minute)


@pytest.mark.parametrize("config", [{"QUEUE_TIMEZONE": "UTC", "QUEUE_CATCH_UP_HOURS": 6}])
def test_a_window_missed_by_a_restart_at_0320_is_opened_at_start(proxy, app, fake):
    pull(proxy, "mistral")
    service = app.extensions["ollamamq.pulls"]
    assert catch_up(app, service, at(3, 20)) is True
    with app.app_context():
        service.wait()
    assert pulls_seen(fake) == ["mistral:latest"]
    assert catch_up(app, service, at(3, 25)) is False  # a second restart: one window


@pytest.mark.parametrize("config", [{"QUEUE_TIMEZONE": "UTC", "QUEUE_CATCH_UP_HOURS": 6}])
def test_a_start_long_after_the_window_waits_for_tomorrow(proxy, app, fake):
    pull(proxy, "mistral")
    assert catch_up(app, app.extensions["ollamamq.pulls"], at(15)) is False
    assert pulls_seen(fake) == []


@pytest.mark.parametrize("config", [{"QUEUE_TIMEZONE": "UTC"}])
def test_no_catch_up_without_a_download_that_waited_for_the_window(proxy, app):
    assert catch_up(app, app.extensions["ollamamq.pulls"], at(3, 20)) is False


def test_the_missed_opening_is_the_latest_unattended_one():
    trigger = CronTrigger.from_crontab("0 3 * * *", timezone=UTC)
    assert missed_opening(trigger, None, at(3, 20), 6) == at(3)
    assert missed_opening(trigger, at(3, 1), at(3, 20), 6) is None  # it did open
    assert missed_opening(trigger, at(3) - timedelta(days=1), at(8, 59), 6) == at(3)
    assert missed_opening(trigger, None, at(9, 1), 6) is None  # too late: tomorrow
    assert missed_opening(trigger, None, at(2, 59), 6) is None  # yesterday's is 24 h old


def test_cancelling_a_running_download_breaks_its_pull(app, proxy, fake):
    fake.pull_gate = Event()  # the pull waits after its first progress record: only a cut ends it
    job = pull(proxy, "qwen2:72b").json()["job"]
    requests.post(f"{proxy}/api/queue/process", json={}, timeout=10).raise_for_status()
    with gevent.Timeout(10, AssertionError("the pull never reached the backend")):
        while not pulls_seen(fake):
            gevent.sleep(0.01)
    service = app.extensions["ollamamq.pulls"]
    with app.app_context():
        assert service.cancel(job)  # as the admin's cancel button does
    with gevent.Timeout(10, AssertionError("the cancelled pull ran on")):
        service.wait()
    fake.pull_gate.set()
    with app.app_context():
        assert service.get(job).status == "cancelled"
