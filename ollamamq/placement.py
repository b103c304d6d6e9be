"""Which backend takes a granted request: pure, like fairshare, which builds on it.

pick_backend() answers for one list of backend views. Slots gives the same answers through
one round of grants (the dispatcher's burst when slots free up), keeping a ranking per
kind of request, so that a grant does not scan every backend again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace

Rank = tuple[bool, bool, int]  # (down, model not loaded, active): the lowest goes first


@dataclass(frozen=True)
class BackendView:
    """What the policy needs to know about a backend at one instant."""

    name: str
    free: int
    active: int
    is_up: bool = True
    models: frozenset[str] | None = None  # None: not known yet, may serve any model
    loaded: frozenset[str] = frozenset()

    def has_model(self, model: str | None) -> bool:
        """Whether this backend can serve `model` (any backend serves a request without one)."""
        return model is None or self.models is None or model in self.models

    def can_take(self, model: str | None, only: str | None) -> bool:
        """Whether it has a free slot for `model` (and is the backend named `only`, if any)."""
        return self.free > 0 and (only is None or self.name == only) and self.has_model(model)

    def rank(self, model: str | None) -> Rank:
        return not self.is_up, model not in self.loaded, self.active


def pick_backend(
    backends: Sequence[BackendView], model: str | None, turn: int = 0, only: str | None = None
) -> int | None:
    """Index of the backend that should take a request for `model`, or None if none can now.

    Healthy backends with the model and a free slot come first; backends that are down
    are tried only when no healthy one has the model. Among candidates: model already
    loaded, then fewest active requests, then round-robin by `turn` on ties. `only` pins
    the request to the backend of that name.
    """
    return Ranking(backends, model, only).pick(turn)


class Ranking:
    """The backends that can take one kind of request, grouped by rank, kept as slots go."""

    def __init__(self, backends: Sequence[BackendView], model: str | None, only: str | None):
        self.model, self.only = model, only
        self._backends = backends
        self._groups: dict[Rank, list[int]] = {}  # indices in order, for the round-robin
        self._rank_of: dict[int, Rank] = {}
        for index, backend in enumerate(backends):
            if backend.can_take(model, only):
                self._add(index, backend.rank(model))

    def pick(self, turn: int) -> int | None:
        if not self._groups:
            return None
        best = min(self._groups)  # a handful of distinct ranks at most
        if best[0] and self._has_healthy_holder():  # only down ones are free: wait for it
            return None
        tied = self._groups[best]
        return tied[turn % len(tied)]

    def update(self, index: int, backend: BackendView) -> None:
        """Take in what the backend at `index` looks like now."""
        rank = self._rank_of.pop(index, None)
        if rank is not None:
            group = self._groups[rank]
            group.remove(index)
            if not group:
                del self._groups[rank]
        if backend.can_take(self.model, self.only):
            self._add(index, backend.rank(self.model))

    def _add(self, index: int, rank: Rank) -> None:
        self._rank_of[index] = rank
        bisect.insort(self._groups.setdefault(rank, []), index)

    def _has_healthy_holder(self) -> bool:
        model, only = self.model, self.only
        return any(
            b.is_up and b.has_model(model) and only in (None, b.name) for b in self._backends
        )


class Slots:
    """The backends through one round of grants: pick() as pick_backend() would answer on
    the views with every take() so far applied.

    A ranking is built the first time a kind of request (model, pinned backend) is asked
    for, and each take() moves one backend in every ranking: a burst of 64 grants on 64
    free backends scans them once per kind, not once per grant.
    """

    def __init__(self, backends: Sequence[BackendView]) -> None:
        self.views = list(backends)
        self.free = sum(view.free for view in self.views if view.free > 0)  # slots left in all
        self._rankings: dict[tuple[str | None, str | None], Ranking] = {}

    def pick(self, model: str | None, turn: int = 0, only: str | None = None) -> int | None:
        ranking = self._rankings.get((model, only))
        if ranking is None:
            ranking = self._rankings[(model, only)] = Ranking(self.views, model, only)
        return ranking.pick(turn)

    def take(self, index: int) -> None:
        """A grant went to backend `index`: one slot fewer, one request more."""
        view = self.views[index]
        self.views[index] = replace(view, free=view.free - 1, active=view.active + 1)
        self.free -= 1
        for ranking in self._rankings.values():
            ranking.update(index, self.views[index])
