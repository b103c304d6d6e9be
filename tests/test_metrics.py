"""`/metrics`: scraped with Prometheus' own parser; the access line from the same record."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import requests
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

from ollamamq.accesslog import OBSERVERS_KEY, Finished
from ollamamq.cli import JsonFormatter, setup_logging
from tests.conftest import wait_until

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
TOKEN = "scraper-token-123"


class Finishes:
    """Records handed to the app's observers, so tests wait for them instead of sleeping."""

    def __init__(self, app) -> None:
        self.records: list[Finished] = []
        self._changed = Event()
        app.extensions[OBSERVERS_KEY].append(self._seen)

    def _seen(self, record: Finished) -> None:
        self.records.append(record)
        self._changed.set()

    def wait_for(self, count: int) -> list[Finished]:
        wait_until(self._changed, lambda: len(self.records) >= count, f"{count} records")
        return self.records


@pytest.fixture
def finishes(app) -> Finishes:
    return Finishes(app)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample as {(name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def scrape(url: str, **headers: str) -> dict:
    response = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(response.text)


def chat(url: str, user: str = "ana", stream: bool = True) -> requests.Response:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return requests.post(f"{url}/api/chat", json=body, headers={"X-User-ID": user}, timeout=10)


def test_a_streamed_chat_is_counted_once_with_its_times_and_tokens(proxy, finishes):
    assert chat(proxy).status_code == 200
    (record,) = finishes.wait_for(1)
    found = scrape(proxy)
    assert value(found, "ollamamq_requests_total", endpoint="/api/chat", status="200") == 1
    assert value(found, "ollamamq_tokens_total", direction="output") == record.tokens_out == 8
    assert value(found, "ollamamq_tokens_total", direction="input") == record.tokens_in > 0
    for name in ("queue_wait", "time_to_first_token", "request_duration"):
        assert value(found, f"ollamamq_{name}_seconds_count") == 1
        assert value(found, f"ollamamq_{name}_seconds_bucket", le="+Inf") == 1
    assert 0 <= record.wait_ms <= record.first_token_ms <= record.duration_ms
    assert record.backend and record.model == "llama3:latest" and record.user == "ana"


def test_state_is_read_at_scrape_time(proxy, fake):
    assert chat(proxy, stream=False).status_code == 200
    found = scrape(proxy)
    backend = fake.url.split("://", 1)[1]
    assert value(found, "ollamamq_queue_waiting") == 0
    assert value(found, "ollamamq_requests_active") == 0
    assert value(found, "ollamamq_backend_up", backend=backend) == 1
    assert value(found, "ollamamq_backend_slots", backend=backend) == 1
    assert value(found, "ollamamq_backend_active", backend=backend) == 0
    assert value(found, "ollamamq_backend_latency_seconds", backend=backend) >= 0
    assert value(found, "ollamamq_downloads", status="pending") == 0
    assert value(found, "ollamamq_download_bytes_total") == 0


def test_the_loaded_model_shows_after_the_next_check(app, proxy, fake):
    assert chat(proxy, stream=False).status_code == 200
    app.extensions["ollamamq"].pool.check_all()
    found = scrape(proxy)
    backend = fake.url.split("://", 1)[1]
    assert value(found, "ollamamq_backend_model_loaded", backend=backend, model="llama3:latest")


@pytest.mark.parametrize("config", [{"MAX_QUEUE_PER_USER": 0}])
def test_a_full_user_queue_counts_as_rate_limited(proxy, finishes):
    assert chat(proxy).status_code == 429
    finishes.wait_for(1)
    found = scrape(proxy)
    assert value(found, "ollamamq_rate_limited_total", reason="user_queue") == 1
    assert value(found, "ollamamq_rate_limited_total", reason="queue_full") == 0
    assert value(found, "ollamamq_requests_total", endpoint="/api/chat", status="429") == 1


@pytest.mark.parametrize("config", [{"METRICS_PER_USER": True}])
def test_per_user_labels_only_when_asked(proxy, finishes):
    chat(proxy, user="ana")
    chat(proxy, user="bo")
    finishes.wait_for(2)
    found = scrape(proxy)
    for user in ("ana", "bo"):
        labels = {"endpoint": "/api/chat", "status": "200", "user": user}
        assert value(found, "ollamamq_requests_total", **labels) == 1
        assert value(found, "ollamamq_tokens_total", direction="output", user=user) == 8
        assert value(found, "ollamamq_queue_waiting", user=user) == 0


def test_no_user_labels_by_default(proxy, finishes):
    chat(proxy, user="ana")
    finishes.wait_for(1)
    assert not any("user" in dict(labels) for _, labels in scrape(proxy))


@pytest.mark.parametrize("config", [{"ADMIN_PASSWORD": "admin-pass", "METRICS_TOKEN": TOKEN}])
def test_other_machines_need_the_token_or_the_admin_password(client_from_afar):
    assert client_from_afar.get("/metrics").status_code == 401
    wrong = client_from_afar.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    for secret in (TOKEN, "admin-pass"):
        ok = client_from_afar.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert ok.status_code == 200 and b"ollamamq_queue_waiting" in ok.data


@pytest.fixture
def client_from_afar(app, proxy):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "10.1.2.3"
    return client


def test_every_metric_the_dashboard_uses_is_exported(proxy, finishes):
    chat(proxy)
    finishes.wait_for(1)
    exported = {name for name, _ in scrape(proxy)}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"ollamamq_[a-z_]+", expr)}
    assert len(used) >= 10
    assert used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue", "wait", "first token", "tokens/s", "backend", "download"):
        assert topic in titles


def test_the_access_line_has_every_field(proxy, finishes, caplog):
    with caplog.at_level(logging.INFO, logger="ollamamq.access"):
        chat(proxy, user="ana")
        finishes.wait_for(1)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "ollamamq.access"]
    for field in ("user=ana", "method=POST", "path=/api/chat", "model=llama3:latest"):
        assert field in line
    for key in ("backend=", "status=200", "wait_ms=", "first_token_ms=", "duration_ms="):
        assert key in line
    assert "tokens_in=" in line and "tokens_out=8" in line


@pytest.mark.parametrize("config", [{"LOG_FORMAT": "json"}])
def test_json_access_lines_have_stable_keys(proxy, finishes, caplog):
    with caplog.at_level(logging.INFO, logger="ollamamq.access"):
        chat(proxy, user="ana")
        finishes.wait_for(1)
    (record,) = [r for r in caplog.records if r.name == "ollamamq.access"]
    entry = json.loads(JsonFormatter().format(record))
    assert list(entry) == [
        "time",
        "level",
        "logger",
        *Finished.__dataclass_fields__,
    ]
    assert entry["user"] == "ana" and entry["status"] == 200 and entry["tokens_out"] == 8
    assert entry["time"].endswith("Z")


def test_other_log_records_are_json_objects_too():
    record = logging.LogRecord("ollamamq.relay", logging.WARNING, "", 0, "a %s", ("b",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a b" and entry["level"] == "WARNING"


def test_the_log_file_is_reopened_after_logrotate_moves_it(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    path = tmp_path / "ollamamq.log"
    try:
        setup_logging("INFO", str(path), "json")
        logging.getLogger("ollamamq.test").info("before")
        path.rename(tmp_path / "ollamamq.log.1")  # what logrotate does
        logging.getLogger("ollamamq.test").info("after")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert json.loads(path.read_text())["message"] == "after"
    assert json.loads((tmp_path / "ollamamq.log.1").read_text())["message"] == "before"
