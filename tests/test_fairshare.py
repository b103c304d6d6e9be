"""The scheduling policy on plain data: no server, no gevent."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq.fairshare import BackendView, FairQueue, Waiting, normalize_model, pick_backend
from ollamamq.placement import Slots

ONE_SLOT = [BackendView("b0", free=1, active=0)]


def drain(queue: FairQueue, backends=ONE_SLOT) -> list[Waiting]:
    """Grant until nothing is left, as if every request finished at once."""
    served = []
    while (choice := queue.grant(backends)) is not None:
        served.append(choice[0])
    return served


def test_normalize_model_matches_ollama_names():
    assert normalize_model("Llama3") == "llama3:latest"
    assert normalize_model("llama3:8b") == "llama3:8b"
    assert normalize_model("hf.co/user/repo:Q4_K_M") == "hf.co/user/repo:q4_k_m"
    assert normalize_model("registry:5000/lib/model") == "registry:5000/lib/model:latest"


def test_two_users_alternate_on_one_backend():
    queue = FairQueue("requests")
    for i in range(6):
        queue.push(Waiting("a", None, payload=f"a{i}"))
    queue.push(Waiting("b", None, payload="b0"))
    queue.push(Waiting("b", None, payload="b1"))
    order = [w.payload for w in drain(queue)]
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_each_user_is_served_in_fifo_order():
    queue = FairQueue("requests")
    for i in range(5):
        queue.push(Waiting("a", None, payload=i))
        queue.push(Waiting("b", None, payload=i))
    served = drain(queue)
    for user in "ab":
        assert [w.payload for w in served if w.user == user] == list(range(5))


def test_removed_request_is_never_granted():
    queue = FairQueue("requests")
    keep, leave = Waiting("a", None), Waiting("a", None)
    queue.push(keep)
    queue.push(leave)
    assert queue.remove(leave) is True
    assert queue.remove(leave) is False
    assert drain(queue) == [keep]
    assert len(queue) == 0


def test_no_grant_without_a_free_slot():
    queue = FairQueue("requests")
    queue.push(Waiting("a", None))
    assert queue.grant([BackendView("b0", free=0, active=1)]) is None
    assert len(queue) == 1


def test_request_goes_only_to_a_backend_with_its_model():
    backends = [
        BackendView("b0", 1, 0, models=frozenset({"llama3:latest"})),
        BackendView("b1", 1, 0, models=frozenset({"qwen2:0.5b"})),
    ]
    assert pick_backend(backends, "qwen2:0.5b") == 1
    assert pick_backend(backends, "mistral:latest") is None


def test_a_user_whose_model_is_busy_does_not_block_others():
    queue = FairQueue("requests")
    queue.push(Waiting("a", "llama3:latest"))
    queue.push(Waiting("b", "qwen2:0.5b"))
    backends = [
        BackendView("b0", 0, 1, models=frozenset({"llama3:latest"})),
        BackendView("b1", 1, 0, models=frozenset({"qwen2:0.5b"})),
    ]
    item, index = queue.grant(backends)
    assert (item.user, index) == ("b", 1)


def test_least_active_then_loaded_then_round_robin():
    idle = BackendView("b0", 2, 0)
    busy = BackendView("b1", 1, 1)
    assert pick_backend([busy, idle], None) == 1
    warm = BackendView("b2", 1, 1, loaded=frozenset({"m:latest"}))
    assert pick_backend([idle, warm], "m:latest") == 1
    assert [pick_backend([idle, idle], None, turn) for turn in range(3)] == [0, 1, 0]


def test_down_backends_are_used_only_when_no_healthy_one_has_the_model():
    down = BackendView("b0", 1, 0, is_up=False)
    up_busy = BackendView("b1", 0, 1)
    assert pick_backend([down, up_busy], None) is None
    assert pick_backend([down], None) == 0


def test_unknown_fairness_mode_is_refused():
    with pytest.raises(ValueError):
        FairQueue("lottery")


# -- "tokens": the Virtual Token Counter -------------------------------------------------------


def serve(queue: FairQueue, costs: dict[str, tuple[int, int]], rounds: int) -> list[str]:
    """Grant and complete one request at a time; `costs` gives each user's (in, out) tokens."""
    order = []
    for _ in range(rounds):
        item, _index = queue.grant(ONE_SLOT)
        order.append(item.user)
        queue.complete(item.user, item.charged, *costs[item.user])
    return order


def backlog(queue: FairQueue, user: str, count: int, estimate: float = 0.0) -> None:
    for _ in range(count):
        queue.push(Waiting(user, None, estimate))


def test_least_served_user_goes_next():
    queue = FairQueue("tokens", output_weight=2)
    backlog(queue, "heavy", 20)
    backlog(queue, "light", 20)
    order = serve(queue, {"heavy": (10, 100), "light": (10, 10)}, rounds=12)
    assert order.count("light") == 10 and order.count("heavy") == 2
    assert abs(queue.service("heavy") - queue.service("light")) <= 210


def test_estimate_is_charged_at_grant_and_corrected_on_completion():
    queue = FairQueue("tokens", output_weight=2)
    queue.push(Waiting("a", None, estimate=50))
    item, _ = queue.grant(ONE_SLOT)
    assert queue.service("a") == 50
    queue.complete("a", item.charged, input_tokens=30, output_tokens=10)
    assert queue.service("a") == 30 + 2 * 10


def test_returning_user_is_lifted_to_the_least_backlogged_counter():
    queue = FairQueue("tokens")
    backlog(queue, "busy", 10)
    serve(queue, {"busy": (100, 0)}, rounds=5)
    backlog(queue, "newcomer", 3)
    assert queue.service("newcomer") == queue.service("busy") == 500
    order = serve(queue, {"busy": (100, 0), "newcomer": (100, 0)}, rounds=4)
    assert order == [
        "busy",
        "newcomer",
        "busy",
        "newcomer",
    ]  # no banked idle time; busy waited longer


def test_user_that_left_keeps_its_counter_when_nobody_waits():
    queue = FairQueue("tokens")
    backlog(queue, "a", 1)
    serve(queue, {"a": (100, 0)}, rounds=1)
    backlog(queue, "b", 1)
    assert queue.service("b") == 100  # lifted to the last counter, not to zero


def test_weight_two_gets_twice_the_service():
    queue = FairQueue("tokens")
    queue.account("gold").weight = 2
    backlog(queue, "gold", 30)
    backlog(queue, "plain", 30)
    order = serve(queue, {"gold": (10, 0), "plain": (10, 0)}, rounds=30)
    assert order.count("gold") == 20 and order.count("plain") == 10


def test_vip_goes_first_whatever_its_counter():
    for fairness in ("tokens", "requests"):
        queue = FairQueue(fairness)
        backlog(queue, "crowd", 5)
        queue.account("boss").is_vip = True
        backlog(queue, "boss", 3)
        order = serve(queue, {"crowd": (1, 1), "boss": (1000, 1000)}, rounds=5)
        assert order == ["boss", "boss", "boss", "crowd", "crowd"]


def test_ties_go_to_the_request_that_has_waited_longest():
    queue = FairQueue("tokens")
    for user in "abc":
        backlog(queue, user, 2)
    order = serve(queue, {u: (0, 0) for u in "abc"}, rounds=6)
    assert order == list("aabbcc")  # nothing charged: the oldest head goes first


def test_requeued_item_goes_back_to_the_head_with_its_charge_refunded():
    queue = FairQueue("tokens")
    first, second = Waiting("a", None, 40), Waiting("a", None, 40)
    queue.push(first)
    queue.push(second)
    item, _ = queue.grant(ONE_SLOT)
    queue.requeue(item)
    assert queue.service("a") == 0 and len(queue) == 2
    assert queue.grant(ONE_SLOT)[0] is first


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 500)), min_size=2, max_size=80),
    weights=st.tuples(st.sampled_from([1.0, 2.0, 3.0]), st.sampled_from([1.0, 2.0, 3.0])),
    estimates=st.lists(st.integers(0, 300), min_size=1, max_size=10),
)
def test_two_backlogged_users_service_stays_within_a_bound(costs, weights, estimates):
    """VTC's bound, partial charges while streaming included: weighted service of
    always-backlogged users stays within two requests' cost (one being served, one charged in
    advance at a guessed size) plus an input guess."""
    queue = FairQueue("tokens", output_weight=2)
    queue.account("a").weight, queue.account("b").weight = weights
    served = {"a": 0.0, "b": 0.0}
    pushed = 0
    for user in "ab":
        for _ in range(len(costs)):
            queue.push(Waiting(user, None, estimates[pushed % len(estimates)]))
            pushed += 1
    for n, (tokens_in, tokens_out) in enumerate(costs):
        item, _ = queue.grant(ONE_SLOT)
        queue.progress(item, tokens_out // 2)  # charged part-way, as a long stream is
        queue.complete(item.user, item.charged, tokens_in, tokens_out)
        served[item.user] += (tokens_in + 2 * tokens_out) / queue.account(item.user).weight
        biggest = max(i + 2 * o for i, o in costs[: n + 1]) / min(weights)
        assert abs(served["a"] - served["b"]) <= 2 * biggest + max(estimates) / min(weights)


def test_expected_output_is_charged_at_grant_so_a_long_generation_counts_at_once():
    queue = FairQueue("tokens", output_weight=2)
    backlog(queue, "heavy", 3)
    two_slots = [BackendView("b0", free=2, active=0)]
    item, _ = queue.grant(two_slots)
    queue.complete("heavy", item.charged, 10, 200)  # its history: long answers
    backlog(queue, "light", 1)  # lifted to heavy's counter: a tie, heavy has waited longer
    first, _ = queue.grant(two_slots)
    assert first.user == "heavy" and first.charged == 2 * 200  # its mean output, in advance
    second, _ = queue.grant(two_slots)  # the second slot goes to light, not heavy again
    assert second.user == "light"


def test_output_limit_caps_the_advance_charge():
    queue = FairQueue("tokens", output_weight=1)
    queue.account("a").mean_output = 500
    queue.push(Waiting("a", None, estimate=0, max_output=20))
    assert queue.grant(ONE_SLOT)[0].charged == 20


# -- no starvation -----------------------------------------------------------------------------


class Watch:
    """Grants one at a time on one slot and records, per request, who went while it waited."""

    def __init__(self, queue: FairQueue, costs: dict[str, int]) -> None:
        self.queue, self.costs = queue, costs
        self.pushes = 0
        self.heads: dict[int, tuple[int, int, float, float, set[str]]] = {}
        self.joined: dict[str, int] = {}  # user: push number at which it last joined
        self.fresh: dict[str, int] = {}  # user: push number at which it first appeared
        self.grants: list[tuple[str, float, int]] = []  # user, counter before, when it joined

    def push(self, user: str) -> None:
        self.pushes += 1
        acct = self.queue.accounts.get(user)
        self.fresh.setdefault(user, self.pushes)
        if acct is None or not acct.queue:
            self.joined[user] = self.pushes
        self.queue.push(Waiting(user, None, estimate=self.costs[user]))
        self.note_heads()

    def note_heads(self) -> None:
        """For each new head: grants so far, pushes so far, its counter, least counter, others."""
        backlog = [u for u, a in self.queue.accounts.items() if a.queue]
        low = min((self.queue.service(u) for u in backlog), default=0.0)
        for user in backlog:
            head = self.queue.accounts[user].queue[0]
            if head.seq not in self.heads:
                others = {u for u in backlog if u != user}
                x = self.queue.service(user)
                self.heads[head.seq] = (len(self.grants), self.pushes, x, low, others)

    def grant(self) -> tuple[Waiting, list[tuple[str, float, int]]]:
        """One grant, completed at once at its estimate; returns it and the grants it waited."""
        item, _ = self.queue.grant(ONE_SLOT)
        before = self.queue.service(item.user) - item.charged
        self.queue.complete(item.user, item.charged, int(item.estimate), 0)
        waited = self.grants[self.heads[item.seq][0] :]
        self.grants.append((item.user, before, self.joined[item.user]))
        self.note_heads()
        return item, waited


arrivals = st.lists(
    st.lists(st.sampled_from(["p0", "p1", "p2", "p3", "new"]), max_size=3), min_size=1, max_size=60
)


@settings(max_examples=80, deadline=None)
@given(script=arrivals, costs=st.lists(st.integers(1, 300), min_size=4, max_size=4))
def test_requests_a_waiting_request_goes_before_any_second_grant_or_later_user(script, costs):
    queue = FairQueue("requests")
    watch = Watch(queue, {f"p{i}": c for i, c in enumerate(costs)})
    for n, step in enumerate(script):
        for k, user in enumerate([*step, "new"]):  # a new user before every grant
            user = f"n{n}.{k}" if user == "new" else user
            watch.costs.setdefault(user, 1)
            watch.push(user)
        item, waited = watch.grant()
        *_, others = watch.heads[item.seq]
        users = [u for u, _c, _t in waited]
        assert len(users) == len(set(users)) and set(users) <= others


@settings(max_examples=80, deadline=None)
@given(
    script=arrivals,
    costs=st.lists(st.integers(1, 300), min_size=4, max_size=4),
    new_cost=st.integers(1, 300),
)
def test_tokens_new_ids_before_every_grant_cannot_hold_a_waiting_request_back(
    script, costs, new_cost
):
    """The docstring's bound: others go first only below its counter, each a bounded number
    of times, and each new id starts at least one charge above the grant before it."""
    queue = FairQueue("tokens")
    watch = Watch(queue, {f"p{i}": c for i, c in enumerate(costs)})
    smallest = min(*costs, new_cost)
    last: float | None = None  # the counter of the latest grant, before its charge
    for n, step in enumerate(script):
        for k, user in enumerate([*step, "new"]):
            user = f"n{n}.{k}" if user == "new" else user
            watch.costs.setdefault(user, new_cost)
            highest = max(
                (queue.service(u) for u, a in queue.accounts.items() if a.queue), default=0
            )
            watch.push(user)
            if last is not None and watch.fresh[user] == watch.pushes:
                assert queue.service(user) >= min(last + smallest, highest)
        item, waited = watch.grant()
        last = watch.grants[-1][1]
        _turn, since, x, low, _others = watch.heads[item.seq]
        assert all(before <= x for _u, before, _j in waited)
        assert all(before < x for _u, before, joined in waited if joined > since)
        per_user = Counter(u for u, _b, _j in waited)
        assert max(per_user.values(), default=0) <= (x - low) // smallest + 1


def rotating_attack(fairness: str, grants: int) -> float:
    """Six requests in flight, each under a fresh id, against a light user with one: its share."""
    queue = FairQueue(fairness, output_weight=2)
    ids = itertools.count()
    for _ in range(6):
        queue.push(Waiting(f"id{next(ids)}", None, estimate=14))
    queue.push(Waiting("light", None, estimate=14))
    light = 0
    running, _ = queue.grant(ONE_SLOT)
    for _ in range(grants):
        queue.complete(running.user, running.charged, 10, 20)
        done, (running, _) = running, queue.grant(ONE_SLOT)  # the slot is taken before the reply
        light += done.user == "light"
        queue.push(Waiting("light" if done.user == "light" else f"id{next(ids)}", None, 14))
    return light / grants


@pytest.mark.parametrize("fairness", ["tokens", "requests"])
def test_a_fresh_id_per_request_gets_a_light_user_one_seventh_not_nothing(fairness):
    assert rotating_attack(fairness, 700) == pytest.approx(1 / 7, abs=0.01)


def test_a_running_stream_is_charged_as_its_records_pass_and_settled_at_the_end():
    queue = FairQueue("tokens", output_weight=2)
    queue.push(Waiting("a", None, estimate=10))
    item, _ = queue.grant(ONE_SLOT)
    queue.progress(item, 30)
    assert queue.service("a") == 10 + 2 * 30
    queue.progress(item, 20)  # never charged back while it runs
    assert queue.service("a") == 10 + 2 * 30
    queue.complete("a", item.charged, input_tokens=12, output_tokens=40)
    assert queue.service("a") == 12 + 2 * 40


def test_a_long_stream_lets_the_other_user_go_before_it_ends():
    queue = FairQueue("tokens", output_weight=2)
    backlog(queue, "long", 2)
    item, _ = queue.grant([BackendView("b0", free=2, active=0)])
    backlog(queue, "short", 1)  # lifted to long's counter: a tie that long would win
    queue.progress(item, 50)
    assert queue.grant([BackendView("b0", free=1, active=1)])[0].user == "short"


# -- the order index ---------------------------------------------------------------------------


def scanned_order(queue: FairQueue) -> list[str]:
    """The serving order as a full scan makes it: every backlogged user sorted by the key."""

    def key(user: str) -> tuple:
        acct = queue.accounts[user]
        standing = acct.counter if queue.fairness == "tokens" else acct.position
        head = acct.queue[0]
        return not acct.is_vip, standing, head.enqueued_at, head.seq

    return sorted((u for u, a in queue.accounts.items() if a.queue), key=key)


def scanned_grant(queue: FairQueue, backends: list[BackendView]) -> Waiting | None:
    """The first head in the scanned order that some backend can take."""
    for user in scanned_order(queue):
        head = queue.accounts[user].queue[0]
        if pick_backend(backends, head.model, 0, head.backend) is not None:
            return head
    return None


steps = st.lists(
    st.tuples(
        st.sampled_from(["push", "push", "grant", "grant", "remove", "configure", "requeue"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([None, "m1", "m2"]),
        st.integers(0, 50),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(script=steps, fairness=st.sampled_from(["tokens", "requests"]))
def test_the_order_index_grants_what_a_full_scan_would(script, fairness):
    queue = FairQueue(fairness)
    backends = [
        BackendView("one", free=1, active=0, models=frozenset({"m1"})),
        BackendView("two", free=1, active=0, models=frozenset({"m2"})),
    ]
    running: list[Waiting] = []
    for action, user, model, amount in script:
        if action == "push":
            pinned = "two" if amount % 7 == 0 else None
            queue.push(Waiting(user, model, estimate=amount, backend=pinned, enqueued_at=amount))
        elif action == "configure":
            queue.configure(user, weight=1 + amount % 3, vip=amount % 5 == 0, blocked=False)
        elif action == "remove" and queue.waiting(user):
            queue.remove(queue.accounts[user].queue[-1])
        elif action == "requeue" and running:
            queue.requeue(running.pop())
        elif action == "grant":
            expected = scanned_grant(queue, backends)
            choice = queue.grant(backends)
            assert (choice and choice[0]) is expected
            if choice is not None:
                queue.progress(choice[0], amount)
                running.append(choice[0])
            if len(running) > 2:
                done = running.pop(0)
                queue.complete(done.user, done.charged, amount, amount)
        assert queue.order() == scanned_order(queue)
        assert len(queue) == sum(len(a.queue) for a in queue.accounts.values())


views = st.lists(
    st.builds(
        BackendView,
        name=st.sampled_from(["b0", "b1", "b2", "b3"]),
        free=st.integers(0, 2),
        active=st.integers(0, 3),
        is_up=st.booleans(),
        models=st.sampled_from([None, frozenset({"m1"}), frozenset({"m1", "m2"})]),
        loaded=st.sampled_from([frozenset(), frozenset({"m1"})]),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    backends=views,
    asks=st.lists(
        st.tuples(st.sampled_from([None, "m1", "m2"]), st.sampled_from([None, "b1"])),
        min_size=1,
        max_size=20,
    ),
)
def test_slots_through_a_round_pick_what_pick_backend_would_on_the_taken_views(backends, asks):
    slots, taken = Slots(backends), list(backends)
    for turn, (model, only) in enumerate(asks):
        expected = pick_backend(taken, model, turn, only)
        assert slots.pick(model, turn, only) == expected
        if expected is not None:
            slots.take(expected)
            view = taken[expected]
            taken[expected] = replace(view, free=view.free - 1, active=view.active + 1)
