"""The fair share (virtual token counter) and the batch credit: pure, no broker."""

from __future__ import annotations

import json
import time

import msgspec

from schemas.messages import ModelStatus, SiteHeartbeat
from services.router.credit import credit, reserve, reserve_share, with_credit
from services.router.fairness import DEFAULT_MAX_TOKENS, Estimate, VirtualTokenCounter, estimate
from tests.site_agent.helpers import make_request


def test_the_estimate_reads_max_tokens_and_counts_the_body_in_quarters() -> None:
    request = make_request("m", body={"model": "m", "prompt": "x" * 400, "max_tokens": 64})
    guess = estimate(request)
    assert guess.completion_tokens == 64
    assert guess.prompt_tokens == len(request.body) // 4
    assert estimate(make_request("m")).completion_tokens == DEFAULT_MAX_TOKENS
    newer = make_request("m", body={"model": "m", "max_completion_tokens": 9, "max_tokens": 64})
    assert estimate(newer).completion_tokens == 9
    garbage = msgspec.structs.replace(request, body=b"not json")
    assert estimate(garbage) == Estimate(2, DEFAULT_MAX_TOKENS)


def test_the_least_served_user_goes_next_and_ties_go_by_user_id() -> None:
    vtc = VirtualTokenCounter()
    assert vtc.pick([]) is None
    assert vtc.pick(["b", "a"]) == "a"
    vtc.charge("r1", "a", Estimate(10, 10))
    assert vtc.pick(["a", "b"]) == "b"
    vtc.charge("r2", "b", Estimate(100, 10))
    assert vtc.pick(["a", "b"]) == "a"


def test_service_is_counted_in_tokens_so_long_prompts_get_fewer_requests() -> None:
    vtc = VirtualTokenCounter()
    served = {"long": 0, "short": 0}
    costs = {"long": Estimate(1000, 64), "short": Estimate(50, 64)}
    for i in range(1000):
        user = vtc.pick(["long", "short"])
        assert user is not None
        vtc.charge(f"r{i}", user, costs[user])
        served[user] += 1
    tokens = {u: served[u] * (costs[u].prompt_tokens + costs[u].completion_tokens) for u in served}
    assert served["short"] > 5 * served["long"]
    assert abs(tokens["long"] - tokens["short"]) <= 1064  # one request's worth apart at most


def test_usage_replaces_the_estimate_and_an_unknown_report_changes_nothing() -> None:
    vtc = VirtualTokenCounter(prompt_weight=0.5)
    vtc.charge("r1", "a", Estimate(100, 256))
    assert vtc.counter("a") == 50 + 256
    assert vtc.correct("r1", prompt_tokens=80, completion_tokens=10)
    assert vtc.counter("a") == 40 + 10
    assert not vtc.correct("r1", prompt_tokens=80, completion_tokens=10)  # once only
    assert not vtc.correct("elsewhere", prompt_tokens=1, completion_tokens=1)
    assert vtc.counter("a") == 50
    vtc.charge("r2", "a", Estimate(2, 2))
    vtc.forget("r2")
    assert vtc.counter("a") == 50


def test_a_user_back_from_idle_is_lifted_to_the_least_waiting_counter() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("r1", "busy", Estimate(500, 500))
    vtc.charge("r2", "other", Estimate(300, 300))
    vtc.arrive("idle", ["busy", "other"])
    assert vtc.counter("idle") == 600  # not 0: idling earns no credit to flood with
    vtc.charge("r3", "rich", Estimate(5000, 0))
    vtc.arrive("rich", ["busy", "other"])
    assert vtc.counter("rich") == 5000  # a user above the minimum keeps its counter
    vtc.arrive("alone", [])
    assert vtc.counter("alone") == 0


def status(capacity: int, running: int = 0, waiting: int = 0, state: str = "hot") -> ModelStatus:
    return ModelStatus(
        model="m", state=state, instances=1, running=running, waiting=waiting, capacity=capacity
    )  # type: ignore[arg-type]


def beat(site_id: str, model_status: ModelStatus, age: float = 0.0) -> SiteHeartbeat:
    return SiteHeartbeat(
        site_id=site_id,
        agent_id="a",
        sent_at=time.time() - age,
        interval_s=2.0,
        models=(model_status,),
        received_at=time.time() - age,
    )


def test_the_reserve_is_lent_to_batch_work_only_after_a_quiet_spell() -> None:
    assert reserve_share(0.25, last_interactive=0.0, now=1000.0, idle_s=30.0) == 0.0
    assert reserve_share(0.25, last_interactive=990.0, now=1000.0, idle_s=30.0) == 0.25
    assert reserve_share(0.25, last_interactive=969.0, now=1000.0, idle_s=30.0) == 0.0
    assert reserve_share(0.25, last_interactive=0.0, now=1000.0, idle_s=0.0) == 0.25  # never


def test_the_reserve_is_a_share_rounded_up_and_at_least_one_slot_from_two() -> None:
    assert reserve(8, 0.25) == 2
    assert reserve(10, 0.25) == 3
    assert reserve(2, 0.25) == 1
    assert reserve(1, 0.25) == 0  # else batch work could never run there
    assert reserve(8, 0.0) == 0
    assert reserve(4, 0.99) == 3  # one slot stays for batch work


def test_credit_counts_running_waiting_sent_and_the_reserve() -> None:
    hb = beat("s", status(8, running=3, waiting=1))
    assert credit(hb, "m", sent=0, share=0.25) == 2
    assert credit(hb, "m", sent=2, share=0.25) == 0
    assert credit(hb, "other", sent=0, share=0.25) == 0
    assert credit(beat("s", status(8, state="starting")), "m", sent=0, share=0.25) == 0


def test_only_live_allowed_sites_with_credit_are_open() -> None:
    now = time.time()
    sites = [
        beat("full", status(8, running=6)),
        beat("open", status(8, running=1)),
        beat("dead", status(8), age=100.0),
        beat("other", status(8)),
    ]
    request = make_request("m")
    open_ids = [hb.site_id for hb in with_credit(request, sites, now, 15.0, {}, 0.25)]
    assert open_ids == ["open", "other"]
    assert with_credit(request, sites, now, 15.0, {"open": 5, "other": 6}, 0.25) == []
    only = msgspec.structs.replace(request, allowed_sites=("open",))
    assert [hb.site_id for hb in with_credit(only, sites, now, 15.0, {}, 0.25)] == ["open"]


def test_a_body_is_json_here() -> None:
    assert json.loads(make_request("m").body)["model"] == "m"
