"""The scheduling policy on plain data: no server, no gevent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ollamamq.fairshare import BackendView, FairQueue, Waiting, normalize_model, pick_backend

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
    assert order == ["newcomer", "busy", "newcomer", "busy"]  # no banked idle time


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


def test_ties_go_to_the_user_granted_longest_ago():
    queue = FairQueue("tokens")
    for user in "abc":
        backlog(queue, user, 2)
    order = serve(queue, {u: (0, 0) for u in "abc"}, rounds=6)
    assert order == list("abcabc")


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
    """VTC's bound: weighted service of always-backlogged users stays within two requests'
    cost (one being served, one charged in advance at a guessed size) plus an input guess."""
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
    first, _ = queue.grant(two_slots)
    assert first.charged == 2 * 200  # the mean output so far, charged in advance
    backlog(queue, "light", 1)
    second, _ = queue.grant(two_slots)  # the second slot goes to light, not heavy again
    assert second.user == "light"


def test_output_limit_caps_the_advance_charge():
    queue = FairQueue("tokens", output_weight=1)
    queue.account("a").mean_output = 500
    queue.push(Waiting("a", None, estimate=0, max_output=20))
    assert queue.grant(ONE_SLOT)[0].charged == 20
