"""Scheduled jobs: the off-peak download window and the history cleanup."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from apscheduler.schedulers.gevent import GeventScheduler
from apscheduler.triggers.cron import CronTrigger
from flask import Flask
from flask_apscheduler import APScheduler

from .pulls import PullService

log = logging.getLogger(__name__)

DOWNLOADS_JOB = "process-downloads"
CLEANUP_JOB = "cleanup-history"
CLEANUP_SCHEDULE = "30 4 * * *"


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


def run_download_window(app: Flask, pulls: PullService) -> None:
    """The off-peak window opens: process every pending download."""
    log.info("download window opens")
    with app.app_context():
        pulls.open_window(app.config["QUEUE_WINDOW_MINUTES"])


def run_cleanup(app: Flask, pulls: PullService) -> None:
    """Prune finished downloads older than CLEANUP_DAYS."""
    with app.app_context():
        gone = pulls.cleanup(app.config["CLEANUP_DAYS"])
    if gone:
        log.info("pruned %d finished downloads", gone)
