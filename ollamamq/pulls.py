"""The download queue: model pulls kept in the database and run off-peak, or when told to."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta

import gevent
import requests
from flask import Flask
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.queue import Queue
from sqlalchemy import select, update

from .backends import Backend, BackendPool
from .extensions import db
from .fairshare import normalize_model
from .jobstore import JobStore, JobView
from .models import (
    CANCELLED,
    COMPLETED,
    DOWNLOADING,
    FAILED,
    PENDING,
    PullJob,
    utcnow,
)
from .supervisor import Supervisor

log = logging.getLogger(__name__)

RUNNER = "runner"
SAVE_EVERY_S = 1.0  # progress is written to the database at most this often per job
_END = object()  # closes a watcher's stream


class PullFailed(Exception):
    """A backend pull ended with an error, or its connection broke."""


def _break(response: requests.Response) -> None:
    """End a pull another greenlet is reading: its read wakes up and closes the response.

    close() from here would not wake it (and may not touch a reader in use).
    """
    connection = response.raw.connection
    if connection is not None and connection.sock is not None:
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)


class PullService(JobStore):
    """Runs the jobs of the store: the download workers, and live progress in memory.

    Greenlets of one process share it; a job is claimed by a conditional UPDATE, so a
    second process (the command line) never runs the same job.
    """

    def __init__(self, app: Flask, pool: BackendPool) -> None:
        self.app = app
        self.pool = pool
        self.next_run: Callable[[], datetime | None] = lambda: None  # set by the scheduler
        self.window_ends: datetime | None = None  # while a scheduled window is open
        self._wanted: set[int] | None = set()  # None: every pending job
        self._until: datetime | None = None
        self.greenlets = Supervisor("downloads")
        self._watchers: dict[int, list[Queue]] = {}
        self._abort: dict[int, Callable[[], None]] = {}
        self._live: dict[int, tuple[int, int]] = {}  # running jobs' bytes, fresher than the db
        self.announce: Callable[[], None] = lambda: None  # replicas: the others abort theirs

    def _live_view(self, job: PullJob) -> JobView:
        """A downloading job with the bytes of its latest progress record."""
        view = JobView.of(job)
        if job.id not in self._live:
            return view
        completed, total = self._live[job.id]
        percent = 100.0 * completed / total if total else 0.0
        return replace(view, completed_bytes=completed, total_bytes=total, percent=percent)

    def is_installed(self, model: str) -> bool:
        """Whether every reachable backend has `model` (asked now, not from the last check)."""
        self.pool.check_all()
        up = [b for b in self.pool if b.is_up]
        return bool(up) and all(normalize_model(model) in (b.models or ()) for b in up)

    def disk_state(self) -> dict | None:
        """The guarded models disk (DISK_PATH): how full, and whether new jobs are taken."""
        path = self.app.config["DISK_PATH"]
        if not path:
            return None
        usage = shutil.disk_usage(path)
        percent = round(100 * usage.used / usage.total, 1)
        threshold = self.app.config["DISK_THRESHOLD"]
        return {
            "path": path,
            "used_percent": percent,
            "threshold": threshold,
            "accepting_downloads": percent <= threshold,
        }

    def is_window_open(self) -> bool:
        """Whether a scheduled download window is open now: new pulls start at once."""
        return self.window_ends is not None and utcnow() < self.window_ends

    def cancel(self, job_id: int) -> bool:
        """Stop a pending or downloading job, here or on the replica that runs it."""
        cancelled = super().cancel(job_id)
        if cancelled:
            self.abort_cancelled([job_id])
            self.announce()
        return cancelled

    def abort_cancelled(self, job_ids: list[int] | None = None) -> None:
        """Break the pulls of jobs cancelled meanwhile (by this process or another):
        the worker then sees "cancelled"."""
        running = [i for i in (job_ids if job_ids is not None else self._abort) if i in self._abort]
        if not running:
            return
        query = select(PullJob.id).where(PullJob.id.in_(running), PullJob.status == CANCELLED)
        for job_id in db.session.scalars(query).all():
            self._abort[job_id]()

    # -- running ---------------------------------------------------------------------------

    def process(self, ids: list[int] | None = None, until: datetime | None = None) -> None:
        """Start downloading now: every pending job, or those in `ids`; none after `until`."""
        if ids is None:
            self._wanted = None
        elif self._wanted is not None:
            self._wanted |= set(ids)
        self._until = until
        if self.greenlets.running(RUNNER) is None:
            self.greenlets.loop(RUNNER, self._run)

    def open_window(self, minutes: int) -> None:
        """A scheduled run: process every pending job, and start new pulls at once meanwhile."""
        self.window_ends = utcnow() + timedelta(minutes=minutes) if minutes else None
        self.process(until=self.window_ends)

    @property
    def is_running(self) -> bool:
        """Whether downloads are being processed now."""
        return self.greenlets.running(RUNNER) is not None

    def wait(self) -> None:
        """Block until the current processing run ends (for the command line and tests)."""
        while (runner := self.greenlets.running(RUNNER)) is not None:
            runner.join()  # a crashed runner's restart is linked before this returns

    def health_problem(self) -> str | None:
        """Why downloads are not being processed as they should, or None."""
        return self.greenlets.health_problem()

    def stop(self) -> None:
        """Stop processing; a download cut here is pending again, resumed at the next start."""
        self.greenlets.stop()

    def watch(self, job_id: int) -> Iterator[bytes]:
        """NDJSON progress of a job, as Ollama's pull stream, until it ends.

        Subscribes at once, so no record is missed between this call and the first read.
        """
        inbox: Queue = Queue()
        self._watchers.setdefault(job_id, []).append(inbox)
        return self._relay_progress(job_id, inbox)

    def _relay_progress(self, job_id: int, inbox: Queue) -> Iterator[bytes]:
        try:
            for record in inbox:
                if record is _END:
                    return
                yield json.dumps(record, separators=(",", ":")).encode() + b"\n"
        finally:
            self._watchers[job_id].remove(inbox)
            if not self._watchers[job_id]:
                del self._watchers[job_id]

    def _run(self) -> None:
        workers = Pool(self.app.config["DOWNLOAD_CONCURRENCY"])
        with self.app.app_context():
            while True:
                job_id = self._claim_next()
                self.greenlets.recovered(RUNNER)
                if job_id is None:
                    workers.join()
                    job_id = self._claim_next()  # asked for while the last ones ran
                    if job_id is None:
                        break
                workers.add(self.greenlets.spawn(f"pull {job_id}", self._download, job_id))
                workers.wait_available()
        self._wanted, self._until = set(), None  # no yield since the last claim found nothing

    def _claim_next(self) -> int | None:
        """Mark the next wanted pending job downloading and return its id."""
        if self._until is not None and utcnow() >= self._until:
            return None  # the window has closed: the rest waits for the next one
        query = select(PullJob.id).where(PullJob.status == PENDING).order_by(PullJob.id)
        if self._wanted is not None:
            query = query.where(PullJob.id.in_(self._wanted))
        for job_id in db.session.scalars(query).all():
            claimed = db.session.execute(
                update(PullJob)
                .where(PullJob.id == job_id, PullJob.status == PENDING)
                .values(status=DOWNLOADING, started_at=utcnow(), last_error=None)
            ).rowcount
            db.session.commit()
            if claimed:
                return job_id
        return None

    def _download(self, job_id: int) -> None:
        with self.app.app_context():
            try:
                job = self._attempt_until_done(job_id)
                ending = (
                    {"status": "success"}
                    if job.status == COMPLETED
                    else {"error": job.last_error or f"download {job.status}"}
                )
            except GreenletExit:  # stopped (a shutdown): the job waits for the next start
                self._stopped(job_id)
                raise
            except Exception as exc:  # a database or programming error must not strand the job
                log.exception("download job %d broke", job_id)
                db.session.rollback()
                self._mark(job_id, FAILED, f"internal error: {exc}")
                ending = {"error": f"internal error: {exc}"}
            self._live.pop(job_id, None)
            self._publish(job_id, ending)
            self._publish(job_id, _END)
            self.pool.check_all()  # the new model is now routable

    def _attempt_until_done(self, job_id: int) -> PullJob:
        """Pull until success, cancellation, or the last attempt failed."""
        job = db.session.get(PullJob, job_id)
        attempts = self.app.config["PULL_ATTEMPTS"]
        delay = self.app.config["PULL_RETRY_DELAY"]
        while job.status == DOWNLOADING:
            job.attempts += 1
            db.session.commit()
            try:
                self._pull_everywhere(job)
            except PullFailed as exc:
                db.session.refresh(job)
                self._failed_attempt(job, str(exc), is_last=job.attempts >= attempts)
                if job.status == DOWNLOADING:
                    gevent.sleep(delay * 2 ** (job.attempts - 1))
                continue
            job.status, job.finished_at = COMPLETED, utcnow()
            db.session.commit()
            log.info("downloaded %s (job %d)", job.model, job.id)
        return job

    def _stopped(self, job_id: int) -> None:
        db.session.rollback()
        db.session.execute(
            update(PullJob)
            .where(PullJob.id == job_id, PullJob.status == DOWNLOADING)
            .values(status=PENDING, started_at=None)
        )
        db.session.commit()
        self._live.pop(job_id, None)
        self._publish(job_id, {"error": "the proxy is shutting down; the pull stays queued"})
        self._publish(job_id, _END)

    def _mark(self, job_id: int, status: str, error: str) -> None:
        db.session.execute(
            update(PullJob)
            .where(PullJob.id == job_id)
            .values(status=status, last_error=error, finished_at=utcnow())
        )
        db.session.commit()

    def _failed_attempt(self, job: PullJob, error: str, is_last: bool) -> None:
        if job.status == CANCELLED:
            log.info("download of %s cancelled (job %d)", job.model, job.id)
            return
        job.last_error = error
        if is_last:
            job.status, job.finished_at = FAILED, utcnow()
            log.warning("download of %s failed for good (job %d): %s", job.model, job.id, error)
        else:
            log.warning("download of %s failed, will retry (job %d): %s", job.model, job.id, error)
        db.session.commit()

    def _pull_everywhere(self, job: PullJob) -> None:
        """Pull on every backend that lacks the model (all of them if none is known)."""
        lacking = [b for b in self.pool if job.model not in (b.models or ())]
        for backend in lacking or self.pool.backends:
            self._pull(backend, job)

    def _pull(self, backend: Backend, job: PullJob) -> None:
        timeout = (self.app.config["CONNECT_TIMEOUT"], self.app.config["TIMEOUT"])
        url = backend.url + "/api/pull"
        layers: dict[str, tuple[int, int]] = {}
        saved = 0.0
        try:
            with backend.session.post(
                url, json={"model": job.model, "stream": True}, stream=True, timeout=timeout
            ) as response:
                self._abort[job.id] = functools.partial(_break, response)
                for line in response.iter_lines():
                    record = json.loads(line) if line.strip() else {}
                    if "error" in record:
                        raise PullFailed(f"{backend.name}: {record['error']}")
                    self._progress(job.id, record, layers)
                    if time.monotonic() - saved >= SAVE_EVERY_S:
                        self._save_progress(job)
                        saved = time.monotonic()
                    if record.get("status") == "success":
                        return
                response.raise_for_status()
        except (requests.RequestException, OSError, ValueError) as exc:
            raise PullFailed(f"{backend.name}: {exc}") from exc
        finally:
            self._abort.pop(job.id, None)
            self._save_progress(job)
        raise PullFailed(f"{backend.name}: the pull stream ended before success")

    def _progress(self, job_id: int, record: dict, layers: dict[str, tuple[int, int]]) -> None:
        if "digest" in record and "total" in record:
            layers[record["digest"]] = (record.get("completed", 0), record["total"])
            done, total = (sum(values) for values in zip(*layers.values(), strict=True))
            self._live[job_id] = (done, total)
        if record.get("status") != "success":
            self._publish(job_id, record)

    def _save_progress(self, job: PullJob) -> None:
        """Write the bytes and commit with no yield between: an open write locks SQLite."""
        if job.id in self._live:
            job.completed_bytes, job.total_bytes = self._live[job.id]
        db.session.commit()

    def _publish(self, job_id: int, record: object) -> None:
        for inbox in self._watchers.get(job_id, ()):
            inbox.put(record)
