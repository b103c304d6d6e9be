"""The download jobs as the database keeps them: read, queued, cancelled, retried.

The store holds no state of its own; PullService (pulls.py) runs the jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from .extensions import db
from .fairshare import normalize_model
from .models import ACTIVE_STATUSES, CANCELLED, DOWNLOADING, FAILED, PENDING, PullJob, utcnow

log = logging.getLogger(__name__)

HISTORY = 50  # finished jobs listed by default


@dataclass(frozen=True)
class JobView:
    """A download job as the API, the admin and the command line show it."""

    id: int
    model: str
    status: str
    requested_by: str
    user: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    completed_bytes: int
    total_bytes: int
    attempts: int
    last_error: str | None
    percent: float
    position: int | None = None  # 1-based place among pending jobs

    @classmethod
    def of(cls, job: PullJob, position: int | None = None) -> JobView:
        values = {f.name: getattr(job, f.name) for f in fields(cls) if f.name != "position"}
        return cls(**values, position=position)

    def as_dict(self) -> dict:
        """JSON-ready, with ISO 8601 UTC times."""
        return {
            f.name: _iso(v) if isinstance(v, datetime) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds") + "Z"


class JobStore:
    """The jobs in the database; every method runs inside an app context."""

    # -- reading ---------------------------------------------------------------------------

    def pending(self) -> list[JobView]:
        """Pending jobs in the order they will run."""
        jobs = db.session.scalars(
            select(PullJob).where(PullJob.status == PENDING).order_by(PullJob.id)
        )
        return [JobView.of(job, n) for n, job in enumerate(jobs, start=1)]

    def jobs(self, history: int = HISTORY) -> list[JobView]:
        """Downloading, then pending in order, then the most recent finished jobs."""
        running = db.session.scalars(select(PullJob).where(PullJob.status == DOWNLOADING))
        finished = db.session.scalars(
            select(PullJob)
            .where(PullJob.status.not_in(ACTIVE_STATUSES))
            .order_by(PullJob.id.desc())
            .limit(history)
        )
        return (
            [self._live_view(j) for j in running]
            + self.pending()
            + [JobView.of(j) for j in finished]
        )

    def get(self, job_id: int) -> JobView | None:
        """One job, or None."""
        job = db.session.get(PullJob, job_id)
        return None if job is None else self._view_with_position(job)

    def _live_view(self, job: PullJob) -> JobView:
        """A downloading job as shown; the runner adds its latest progress."""
        return JobView.of(job)

    def counts(self) -> dict[str, int]:
        """Jobs by status."""
        rows = db.session.execute(select(PullJob.status, func.count()).group_by(PullJob.status))
        return {status: count for status, count in rows}

    def active_job(self, model: str) -> JobView | None:
        """The pending or downloading job for `model`, if any."""
        job = db.session.scalar(
            select(PullJob).where(
                PullJob.model == normalize_model(model), PullJob.status.in_(ACTIVE_STATUSES)
            )
        )
        return None if job is None else self._view_with_position(job)

    # -- changing --------------------------------------------------------------------------

    def enqueue(self, model: str, requested_by: str, user: str | None) -> tuple[JobView, bool]:
        """A new pending job for `model`, or the active one already there (and False)."""
        job = PullJob(
            model=normalize_model(model), status=PENDING, requested_by=requested_by, user=user
        )
        db.session.add(job)
        try:
            db.session.commit()
        except IntegrityError:  # the unique index on active jobs: someone queued it first
            db.session.rollback()
            existing = self.active_job(model)
            if existing is None:
                raise
            return existing, False
        log.info("queued download of %s for %s (job %d)", job.model, requested_by, job.id)
        return self._view_with_position(job), True

    def remove_model(self, model: str) -> bool:
        """Drop the pending job for `model`; False if there is none."""
        job = self.active_job(model)
        return job is not None and job.status == PENDING and self.remove(job.id)

    def remove(self, job_id: int) -> bool:
        """Delete a job that is not downloading."""
        job = db.session.get(PullJob, job_id)
        if job is None or job.status == DOWNLOADING:
            return False
        db.session.delete(job)
        db.session.commit()
        return True

    def cancel(self, job_id: int) -> bool:
        """Stop a pending or downloading job; it stays in the history as cancelled."""
        changed = db.session.execute(
            update(PullJob)
            .where(PullJob.id == job_id, PullJob.status.in_(ACTIVE_STATUSES))
            .values(status=CANCELLED, finished_at=utcnow())
        ).rowcount
        db.session.commit()
        return bool(changed)

    def retry(self, job_id: int) -> bool:
        """Put a failed or cancelled job back in the queue, with fresh attempts."""
        job = db.session.get(PullJob, job_id)
        if job is None or job.status not in (FAILED, CANCELLED) or self.active_job(job.model):
            return False
        job.status, job.attempts, job.last_error, job.finished_at = PENDING, 0, None, None
        db.session.commit()
        return True

    def recover(self) -> int:
        """After a crash or restart, jobs left downloading wait again (Ollama resumes pulls)."""
        changed = db.session.execute(
            update(PullJob).where(PullJob.status == DOWNLOADING).values(status=PENDING)
        ).rowcount
        db.session.commit()
        if changed:
            log.info("%d interrupted downloads are pending again", changed)
        return changed

    def cleanup(self, days: int) -> int:
        """Delete finished jobs older than `days`."""
        cutoff = utcnow() - timedelta(days=days)
        gone = db.session.execute(
            PullJob.__table__.delete().where(
                PullJob.status.not_in(ACTIVE_STATUSES), PullJob.created_at < cutoff
            )
        ).rowcount
        db.session.commit()
        return gone

    def _view_with_position(self, job: PullJob) -> JobView:
        if job.status != PENDING:
            return JobView.of(job)
        ahead = db.session.scalar(
            select(func.count()).where(PullJob.status == PENDING, PullJob.id < job.id)
        )
        return JobView.of(job, ahead + 1)
