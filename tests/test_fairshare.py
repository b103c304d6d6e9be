"""The scheduling policy on plain data: no server, no gevent."""

from __future__ import annotations

import pytest

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
