"""Scheduled jobs: the off-peak download window and the history cleanup."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.gevent import GeventScheduler
from apscheduler.triggers.cron import CronTrigger
from flask import Flask
from flask_apscheduler import APScheduler
from gevent import Greenlet
from sqlalchemy import select

from .extensions import db
from .models import PENDING, PullJob, WindowOpening
from .pulls import PullService
from .supervisor import Supervisor

log = logging.getLogger(__name__)

DOWNLOADS_JOB = "process-downloads"
CLEANUP_JOB = "cleanup-history"
CLEANUP_SCHEDULE = "30 4 * * *"
MAIN_LOOP = "main loop"


def init_scheduler(app: Flask, pulls: PullService) -> APScheduler:
    """A scheduler for this app (not shared: it holds running state), with its jobs added.

    It runs in the server process's gevent hub; start it with start_scheduler().
    """
    scheduler = APScheduler(GeventScheduler())
    scheduler.init_app(app)
    zone = app.config["QUEUE_TIMEZONE"]
    scheduler.add_job(
        DOWNLOADS_JOB,
        run_download_window,
        args=[app, pulls],
        trigger=CronTrigger.from_crontab(app.config["QUEUE_SCHEDULE"], timezone=zone),
        misfire_grace_time=3600,
        coalesce=True,
        max_instances=1,
    )
    scheduler.add_job(
        CLEANUP_JOB,
        run_cleanup,
        args=[app, pulls],
        trigger=CronTrigger.from_crontab(CLEANUP_SCHEDULE, timezone=zone),
        misfire_grace_time=3600,
        coalesce=True,
    )
    pulls.next_run = lambda: next_run(scheduler)
    return scheduler


def next_run(scheduler: APScheduler) -> datetime | None:
    """When the download window opens next, in UTC without tzinfo (as stored)."""
    job = scheduler.get_job(DOWNLOADS_JOB)
    when = getattr(job, "next_run_time", None)
    if when is None:  # not started yet: ask the trigger
        when = job.trigger.get_next_fire_time(None, datetime.now(UTC)) if job else None
    return when.astimezone(UTC).replace(tzinfo=None) if when else None


def run_download_window(app: Flask, pulls: PullService, now: datetime | None = None) -> None:
    """The off-peak window opens: process every pending download (on one replica only)."""
    now = now or datetime.now(UTC)
    trigger = app.extensions["ollamamq.scheduler"].get_job(DOWNLOADS_JOB).trigger
    due = missed_opening(trigger, None, now, hours=1) or now  # a replica may fire late
    if not _is_mine(app, due):
        return
    log.info("download window opens")
    with app.app_context():
        open_window(pulls, app.config["QUEUE_WINDOW_MINUTES"], now)


def _is_mine(app: Flask, opening: datetime) -> bool:
    """Whether this process opens the window due at `opening`: replicas claim it in Redis."""
    minute = opening.astimezone(UTC).strftime("%Y-%m-%dT%H:%M")
    if app.extensions["ollamamq"].claim(f"window:{minute}"):
        return True
    log.info("the download window of %s is opened by another replica", minute)
    return False


def open_window(pulls: PullService, minutes: int, now: datetime) -> None:
    """Open the window and remember when, for the catch-up after a restart."""
    row = db.session.get(WindowOpening, 1) or WindowOpening(id=1)
    row.opened_at = now.astimezone(UTC).replace(tzinfo=None)
    db.session.add(row)
    db.session.commit()
    pulls.open_window(minutes)


def missed_opening(
    trigger: CronTrigger, last_opened: datetime | None, now: datetime, hours: float
) -> datetime | None:
    """The latest scheduled opening in the `hours` before `now` that did not happen."""
    latest, fire = None, trigger.get_next_fire_time(None, now - timedelta(hours=hours))
    while fire is not None and fire <= now:
        latest, fire = fire, trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    if latest is None or (last_opened is not None and last_opened >= latest):
        return None
    return latest


def _waited_for(opening: datetime) -> bool:
    """Whether a download was pending before `opening`: only then was it truly missed."""
    before = opening.astimezone(UTC).replace(tzinfo=None)
    query = select(PullJob.id).where(PullJob.status == PENDING, PullJob.created_at < before)
    return db.session.scalar(query.limit(1)) is not None


def catch_up(app: Flask, pulls: PullService, now: datetime) -> bool:
    """At start: open a window the process slept through, if it was due less than
    QUEUE_CATCH_UP_HOURS ago (a reboot for updates at 03:00 must not skip the night)."""
    trigger = app.extensions["ollamamq.scheduler"].get_job(DOWNLOADS_JOB).trigger
    with app.app_context():
        row = db.session.get(WindowOpening, 1)
        last = row.opened_at.replace(tzinfo=UTC) if row is not None else None
        missed = missed_opening(trigger, last, now, app.config["QUEUE_CATCH_UP_HOURS"])
        if missed is None or not _waited_for(missed) or not _is_mine(app, missed):
            return False
        log.info("the download window due at %s was missed; opening it now", missed.isoformat())
        open_window(pulls, app.config["QUEUE_WINDOW_MINUTES"], now)
    return True


def run_cleanup(app: Flask, pulls: PullService) -> None:
    """Prune finished downloads older than CLEANUP_DAYS."""
    with app.app_context():
        gone = pulls.cleanup(app.config["CLEANUP_DAYS"])
    if gone:
        log.info("pruned %d finished downloads", gone)


class SchedulerKeeper:
    """Runs the scheduler and watches it: a crashed main loop is restarted, a failed job shown.

    APScheduler logs a failed job's traceback itself; the keeper names it on /health until
    that job next succeeds. Its listener runs in APScheduler's greenlets and never yields.
    """

    def __init__(self, scheduler: APScheduler) -> None:
        self.scheduler = scheduler
        self.greenlets = Supervisor("scheduler")
        self._failed: dict[str, str] = {}
        self.main_loop: Greenlet | None = None  # APScheduler's own, joined by ours
        scheduler.add_listener(self._job_ended, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)

    def start(self) -> None:
        """Start the scheduler, supervised."""
        self.greenlets.loop(MAIN_LOOP, self._run)

    def stop(self) -> None:
        """Stop the scheduler; running jobs are left to their owners."""
        self.greenlets.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def health_problem(self) -> str | None:
        """Why scheduled work is not healthy, or None."""
        failed = [f"scheduled job {job} failed: {error}" for job, error in self._failed.items()]
        return "; ".join(p for p in (self.greenlets.health_problem(), *failed) if p) or None

    def _run(self) -> None:
        if self.scheduler.running:  # restarted: its main loop died under it
            self.scheduler.shutdown(wait=False)
        self.main_loop = self.scheduler.scheduler.start()  # GeventScheduler: its loop's greenlet
        self.greenlets.recovered(MAIN_LOOP)
        self.main_loop.get()  # a crash of the main loop is raised here, in the supervised greenlet

    def _job_ended(self, event: JobExecutionEvent) -> None:
        if event.exception is None:
            self._failed.pop(event.job_id, None)
        else:
            self._failed[event.job_id] = repr(event.exception)
