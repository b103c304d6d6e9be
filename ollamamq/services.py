"""The one way views reach the app's owner objects (kept in `app.extensions`)."""

from __future__ import annotations

from flask import current_app
from flask_apscheduler import APScheduler

from .dispatcher import Dispatcher
from .jobs import SchedulerKeeper
from .keys import RING_KEY, KeyRing
from .network import NetworkRules
from .pulls import PullService
from .users import UserSettings


def dispatcher() -> Dispatcher:
    """The app's dispatcher: waiting requests, slots, backends."""
    return current_app.extensions["ollamamq"]


def pulls() -> PullService:
    """The app's download queue."""
    return current_app.extensions["ollamamq.pulls"]


def user_settings() -> UserSettings:
    """The app's per-user standing orders."""
    return current_app.extensions["ollamamq.users"]


def scheduler() -> APScheduler:
    """The app's scheduler."""
    return current_app.extensions["ollamamq.scheduler"]


def keys() -> KeyRing:
    """The app's API keys."""
    return current_app.extensions[RING_KEY]


def networks() -> NetworkRules:
    """The app's allowed and blocked client networks."""
    return current_app.extensions["ollamamq.networks"]


def scheduler_keeper() -> SchedulerKeeper:
    """The app's watch over its scheduler."""
    return current_app.extensions["ollamamq.scheduler_keeper"]


def problems() -> list[str]:
    """What each owner says is wrong with its greenlets (a crash not yet recovered)."""
    queue = dispatcher()
    extensions = current_app.extensions
    owners = (
        queue,
        queue.pool,
        pulls(),
        scheduler_keeper(),
        keys(),
        extensions["ollamamq.budgets"],
    )
    return [problem for owner in owners if (problem := owner.health_problem())]
