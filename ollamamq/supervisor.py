"""Owned greenlets: each one named, each crash logged with its traceback and shown on /health."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent
from gevent import Greenlet
from gevent.pool import Group

log = logging.getLogger(__name__)

# Seconds before a crashed loop is restarted, by how many times in a row it has crashed:
# at once the first time, then slower, so a loop that always breaks does not spin.
RESTART_DELAYS = (0.0, 1.0, 5.0, 30.0)

CrashHandler = Callable[[BaseException], None]


class Supervisor:
    """One owner's greenlets, in one gevent Group (Locust's runners keep theirs the same way).

    Every crash is logged with its traceback and named by health_problem() until that
    greenlet is back: a loop is restarted and reports itself back with recovered(); a
    one-off task is back when a task of the same name next ends well. One hub and no
    method yields, so no locks are needed.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.group = Group()
        self._problems: dict[str, str] = {}
        self._crashes: dict[str, int] = {}
        self._loops: set[Greenlet] = set()
        self._stopped = False

    def loop(self, name: str, function: Callable[..., Any], *args: Any) -> Greenlet:
        """Run `function(*args)`, meant to run until stop(); it is restarted if it crashes."""
        self._stopped = False
        return self._start_loop(name, function, args)

    def every(self, name: str, seconds: float, function: Callable[[], Any]) -> Greenlet:
        """Call `function` every `seconds` in a loop that is restarted if it crashes."""
        return self.loop(name, self._every, name, seconds, function)

    def _every(self, name: str, seconds: float, function: Callable[[], Any]) -> None:
        while True:
            gevent.sleep(seconds)
            function()
            self.recovered(name)

    def spawn(
        self,
        name: str,
        function: Callable[..., Any],
        *args: Any,
        on_crash: CrashHandler | None = None,
    ) -> Greenlet:
        """Run a one-off task; a crash is logged and handed to `on_crash`, never retried."""
        greenlet = self._start(name, function, args, on_crash)
        greenlet.link_value(lambda _: self.recovered(name))
        return greenlet

    def spawn_later(
        self, seconds: float, name: str, function: Callable[..., Any], *args: Any
    ) -> Greenlet:
        """Run a one-off task after `seconds`; a crash is logged."""
        return self._start(name, function, args, None, seconds)

    def running(self, name: str) -> Greenlet | None:
        """The loop `name` while it runs (or waits to be restarted), else None."""
        suffix = f"-{name}"
        return next((g for g in self._loops if g.name.endswith(suffix) and not g.dead), None)

    def recovered(self, name: str) -> None:
        """`name` has done a round of work since its crash: it is healthy again."""
        self._crashes.pop(name, None)
        if self._problems.pop(name, None) is not None:
            log.info("%s: %s is back", self.owner, name)

    def health_problem(self) -> str | None:
        """Why this owner is not healthy, or None."""
        return "; ".join(self._problems.values()) or None

    def stop(self, grace: float = 0.0) -> None:
        """Kill the loops, give one-off tasks `grace` seconds to end, then kill them too.

        Nothing is restarted after this. The grace spares a connect cut in the middle
        (urllib3 leaks the socket of a connect interrupted by GreenletExit).
        """
        self._stopped = True
        Group(self._loops).kill(block=True, timeout=5)
        if grace:
            self.group.join(timeout=grace)
        self.group.kill(block=True, timeout=5)

    def _start(
        self,
        name: str,
        function: Callable,
        args: tuple,
        on_crash: CrashHandler | None,
        delay: float = 0.0,
    ) -> Greenlet:
        greenlet = Greenlet(function, *args)
        greenlet.name = f"ollamamq-{self.owner}-{name}"
        greenlet.link_exception(partial(self._crashed, name, on_crash))
        self.group.add(greenlet)
        if delay:
            greenlet.start_later(delay)
        else:
            greenlet.start()
        return greenlet

    def _crashed(self, name: str, on_crash: CrashHandler | None, greenlet: Greenlet) -> None:
        log.error("%s: %s crashed", self.owner, name, exc_info=greenlet.exc_info)
        self._problems[name] = f"{self.owner}: {name} crashed ({greenlet.exception!r})"
        if on_crash is not None:
            on_crash(greenlet.exception)

    def _restart(self, name: str, function: Callable, args: tuple, error: BaseException) -> None:
        if self._stopped or self.running(name) is not None:
            return  # stopped, or already started again by its owner
        crashes = self._crashes[name] = self._crashes.get(name, 0) + 1
        delay = RESTART_DELAYS[min(crashes, len(RESTART_DELAYS)) - 1]
        self._problems[name] += f", restarting in {delay:g} s"
        log.warning("%s: restarting %s in %g s", self.owner, name, delay)
        self._start_loop(name, function, args, delay)

    def _start_loop(self, name: str, function: Callable, args: tuple, delay: float = 0) -> Greenlet:
        restart = partial(self._restart, name, function, args)
        greenlet = self._start(name, function, args, restart, delay)
        self._loops.add(greenlet)
        greenlet.rawlink(self._loops.discard)
        return greenlet
