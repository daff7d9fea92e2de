"""The routing policies and the cold-start decision: pure, no event loop, no broker."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any, get_args

import msgspec
import pytest

from schemas.messages import ModelState, ModelStatus, RunInference, SiteHeartbeat
from services.router.policy import (
    DEFAULT_TOKENS_PER_S,
    MEAN_OUTPUT_TOKENS,
    POLICIES,
    PREFIX_CHARS,
    START_GRACE_S,
    Affinity,
    NoSite,
    Policy,
    PolicyState,
    StartOn,
    WaitFor,
    affinity_key,
    choose_site,
    choose_start_site,
    estimated_wait_s,
    free_capacity,
    request_tokens_per_s,
)

NOW = 1_000_000.0
TTL = 15.0
SERVICE_S = MEAN_OUTPUT_TOKENS / DEFAULT_TOKENS_PER_S  # one request's time at unknown speed


class SessionRequest(RunInference, tag="SessionRequest", frozen=True, kw_only=True):
    """RunInference with the header-derived session field the router will add."""

    session: str = ""


def request(model: str = "m", body: Any = None, **fields: Any) -> RunInference:
    return RunInference(
        request_id="r1",
        user_id=fields.pop("user_id", "u"),
        username="user",
        model=model,
        endpoint="chat.completions",
        body=json.dumps(body if body is not None else {}).encode(),
        created_at=NOW,
        expires_at=NOW + 60,
        **fields,
    )


def chat(user: str | None = None, *contents: str) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": c} for c in contents]}
    if user is not None:
        body["user"] = user
    return body


def status(
    model: str = "m",
    *,
    state: ModelState = "hot",
    capacity: int = 8,
    running: int = 0,
    waiting: int = 0,
    tokens_per_s: float = 0.0,
    slots_per_instance: int = 8,
    max_instances: int = 1,
    restarts: int = 0,
) -> ModelStatus:
    return ModelStatus(
        model=model,
        state=state,
        instances=1 if state == "hot" else 0,
        running=running,
        waiting=waiting,
        capacity=capacity if state == "hot" else 0,
        tokens_per_s=tokens_per_s,
        slots_per_instance=slots_per_instance,
        max_instances=max_instances,
        restarts=restarts,
    )


def beat(
    site_id: str, *, age: float = 1.0, interval_s: float = 2.0, **fields: Any
) -> SiteHeartbeat:
    models = fields.pop("models", None) or (status(**fields),)
    return SiteHeartbeat(
        site_id=site_id,
        agent_id="a",
        sent_at=NOW - age,
        interval_s=interval_s,
        models=models,
        received_at=NOW - age,
    )


# estimated_wait_s


def test_a_free_slot_means_no_wait() -> None:
    assert estimated_wait_s(status(capacity=8, running=7)) == 0.0


def test_a_full_site_waits_for_one_of_its_slots_to_free() -> None:
    assert estimated_wait_s(status(capacity=8, running=8)) == pytest.approx(SERVICE_S / 8)


def test_each_request_queued_ahead_adds_to_the_wait() -> None:
    full = status(capacity=4, running=4, waiting=2)
    assert estimated_wait_s(full) == pytest.approx(3 / 4 * SERVICE_S)
    assert estimated_wait_s(full, in_flight=2) == pytest.approx(5 / 4 * SERVICE_S)


def test_what_was_sent_since_the_heartbeat_fills_free_slots() -> None:
    assert estimated_wait_s(status(capacity=4, running=2), in_flight=1) == 0.0
    assert estimated_wait_s(status(capacity=4, running=2), in_flight=2) > 0.0


def test_the_measured_speed_per_running_request_sets_the_service_time() -> None:
    # 8 requests sharing 320 tokens/s: 40 tokens/s each; 64 tokens take 1.6 s.
    full = status(capacity=8, running=8, tokens_per_s=320.0)
    assert request_tokens_per_s(full) == 40.0
    assert estimated_wait_s(full, mean_output_tokens=64) == pytest.approx(1.6 / 8)


@pytest.mark.parametrize("speed", [0.0, -5.0, math.nan, math.inf])
def test_an_unmeasured_or_absurd_speed_falls_back_to_the_default(speed: float) -> None:
    assert request_tokens_per_s(status(running=8, tokens_per_s=speed)) == DEFAULT_TOKENS_PER_S


def test_an_idle_sites_speed_is_unknown() -> None:
    assert request_tokens_per_s(status(running=0, tokens_per_s=50.0)) == DEFAULT_TOKENS_PER_S


def test_a_site_without_capacity_waits_forever() -> None:
    assert estimated_wait_s(status(capacity=0)) == math.inf


def test_free_capacity_subtracts_everything() -> None:
    assert free_capacity(status(capacity=10, running=3, waiting=2)) == 5
    assert free_capacity(status(capacity=10, running=3, waiting=2), 7) == -2


# choose_site, policy "first"


def test_no_sites_means_none() -> None:
    assert choose_site(request(), [], NOW, TTL) is None


def test_live_hot_site_is_chosen() -> None:
    assert choose_site(request(), [beat("a")], NOW, TTL) == "a"


def test_site_older_than_ttl_is_not_live() -> None:
    assert choose_site(request(), [beat("a", age=TTL)], NOW, TTL) is None
    assert choose_site(request(), [beat("a", age=TTL - 0.01)], NOW, TTL) == "a"


def test_expired_site_loses_to_a_live_busier_one() -> None:
    sites = [beat("idle", age=TTL + 1), beat("busy", running=7)]
    assert choose_site(request(), sites, NOW, TTL) == "busy"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("state", ["cold", "starting", "draining"])
def test_only_hot_models_are_dispatched_to(policy: Policy, state: ModelState) -> None:
    assert (
        choose_site(
            request(), [beat("a", state=state)], NOW, TTL, policy=policy, state=PolicyState()
        )
        is None
    )


def test_hot_beats_cold_however_roomy() -> None:
    sites = [
        beat("cold", state="cold", capacity=64),
        beat("hot", capacity=8, running=8, waiting=20),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "hot"


def test_site_without_the_model_is_skipped() -> None:
    other = beat("a", models=(status("other", capacity=100),))
    assert choose_site(request(), [other, beat("b", running=6)], NOW, TTL) == "b"


def test_a_site_serving_several_models_is_judged_on_the_requested_one() -> None:
    both = beat("a", models=(status("other", running=8), status("m", running=0)))
    assert choose_site(request(), [both, beat("b", running=4)], NOW, TTL) == "a"


def test_among_free_slots_the_most_free_wins_at_equal_speed() -> None:
    sites = [
        beat("a", capacity=8, running=6),
        beat("b", capacity=8, running=2, waiting=1),
        beat("c", capacity=16, running=12),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "b"


def test_among_free_slots_spare_speed_wins() -> None:
    # a: 1 slot at 40 tokens/s; b: 3 slots at 10 tokens/s. 40 > 30.
    sites = [
        beat("a", capacity=8, running=7, tokens_per_s=280.0),
        beat("b", capacity=4, running=1, tokens_per_s=10.0),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "a"


def test_a_free_slot_beats_a_queue_on_a_faster_site() -> None:
    sites = [
        beat("fast", capacity=8, running=8, tokens_per_s=8000.0),
        beat("slow", capacity=2, running=1, tokens_per_s=1.0),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "slow"


def test_when_all_are_full_the_least_estimated_wait_wins() -> None:
    # fast: 5 ahead of 4 slots at 100 tokens/s each -> 3.2 s; slow: 1 ahead at 1 token/s -> 64 s.
    sites = [
        beat("fast", capacity=4, running=4, waiting=4, tokens_per_s=400.0),
        beat("slow", capacity=4, running=4, tokens_per_s=4.0),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "fast"


def test_overloaded_sites_still_rank_by_estimated_wait() -> None:
    sites = [beat("a", capacity=8, running=8, waiting=5), beat("b", capacity=8, waiting=9)]
    assert choose_site(request(), sites, NOW, TTL) == "b"


def test_a_site_that_missed_a_heartbeat_ranks_after_punctual_ones() -> None:
    sites = [beat("late", age=5.1, running=0), beat("busy", age=1.0, running=8, waiting=8)]
    assert choose_site(request(), sites, NOW, TTL) == "busy"
    assert choose_site(request(), sites[:1], NOW, TTL) == "late"  # still live: a last resort


def test_ties_go_to_the_smallest_site_id_whatever_the_order() -> None:
    sites = [beat("c"), beat("a"), beat("b")]
    assert choose_site(request(), sites, NOW, TTL) == "a"
    assert choose_site(request(), list(reversed(sites)), NOW, TTL) == "a"


def test_sent_but_unreflected_work_counts_against_a_site() -> None:
    sites = [beat("a", capacity=8, running=1), beat("b", capacity=8, running=3)]
    assert choose_site(request(), sites, NOW, TTL, sent={"a": 1}) == "a"
    assert choose_site(request(), sites, NOW, TTL, sent={"a": 3}) == "b"
    assert choose_site(request(), sites, NOW, TTL, sent={"zzz": 99}) == "a"


@pytest.mark.parametrize("policy", POLICIES)
def test_only_the_catalogues_allowed_sites_are_candidates(policy: Policy) -> None:
    def choose(req: RunInference) -> str | None:
        return choose_site(req, sites, NOW, TTL, policy=policy, state=PolicyState())

    sites = [beat("roomy", capacity=64), beat("busy", capacity=8, running=8)]
    assert choose(request(allowed_sites=("busy",))) == "busy"
    assert choose(request(allowed_sites=("elsewhere",))) is None


def test_every_policy_is_offered() -> None:
    assert set(POLICIES) == set(get_args(Policy))


# affinity


def test_a_session_stays_on_its_site_while_that_has_a_free_slot() -> None:
    state = PolicyState()
    req = request(body=chat("alice", "hi"))
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL, state=state) == "a"
    sites = [beat("a", running=6), beat("b", running=0)]  # b now has more room
    assert choose_site(req, sites, NOW + 1, TTL, state=state) == "a"
    assert choose_site(request(body=chat("bob", "hi")), sites, NOW + 1, TTL, state=state) == "b"


def test_a_session_leaves_a_full_site_for_a_free_slot_and_stays_there() -> None:
    state = PolicyState()
    req = request(body=chat("alice", "hi"))
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL, state=state) == "a"
    full_a = [beat("a", running=8), beat("b", running=4)]
    assert choose_site(req, full_a, NOW + 1, TTL, state=state) == "b"
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW + 2, TTL, state=state) == "b"


def test_a_session_leaves_a_dead_or_late_site() -> None:
    req = request(body=chat("alice", "hi"))
    for gone in (beat("a", age=TTL + 1), beat("a", age=6.0), beat("a", state="draining")):
        state = PolicyState()
        assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL, state=state) == "a"
        assert choose_site(req, [gone, beat("b", running=4)], NOW, TTL, state=state) == "b"


def test_a_session_accepts_a_slightly_longer_queue_but_not_a_much_longer_one() -> None:
    state = PolicyState(affinity_slack_s=0.5)
    req = request(body=chat("alice", "hi"))
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL, state=state) == "a"
    # 8 slots at 256 tokens/s each: one request more ahead is 1/8 s more to wait.
    speed = 8 * MEAN_OUTPUT_TOKENS
    slightly = [
        beat("a", running=8, waiting=1, tokens_per_s=speed),
        beat("b", running=8, tokens_per_s=speed),
    ]
    assert choose_site(req, slightly, NOW + 1, TTL, state=state) == "a"
    much = [
        beat("a", running=8, waiting=5, tokens_per_s=speed),
        beat("b", running=8, tokens_per_s=speed),
    ]
    assert choose_site(req, much, NOW + 2, TTL, state=state) == "b"


def test_without_state_there_is_no_affinity() -> None:
    req = request(body=chat("alice", "hi"))
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL) == "a"
    assert choose_site(req, [beat("a", running=6), beat("b")], NOW, TTL) == "b"


def test_a_forgotten_session_goes_to_the_best_site() -> None:
    state = PolicyState(affinity=Affinity(ttl_s=5.0))
    req = request(body=chat("alice", "hi"))
    assert choose_site(req, [beat("a"), beat("b", running=4)], NOW, TTL, state=state) == "a"
    later = [beat("a", running=6), beat("b")]
    assert choose_site(req, later, NOW + 4.9, TTL, state=state) == "a"
    assert choose_site(req, later, NOW + 4.9 + 5.0, TTL, state=state) == "b"


def test_affinity_memory_forgets_the_least_recently_used_key_first() -> None:
    memory = Affinity(max_keys=2)
    memory.remember("k1", "a", NOW)
    memory.remember("k2", "b", NOW)
    assert memory.site("k1", NOW) == "a"
    memory.remember("k1", "a", NOW)  # k1 used again: k2 is now the oldest
    memory.remember("k3", "c", NOW)
    assert len(memory) == 2
    assert memory.site("k2", NOW) is None
    assert memory.site("k1", NOW) == "a"
    assert memory.site("k3", NOW) == "c"


def test_affinity_memory_forgets_keys_older_than_its_ttl() -> None:
    memory = Affinity(ttl_s=10.0)
    memory.remember("k", "a", NOW)
    assert memory.site("k", NOW + 9.9) == "a"
    assert memory.site("k", NOW + 10.0) is None
    assert len(memory) == 0


# affinity_key


def test_an_explicit_session_comes_before_the_body_user() -> None:
    def with_session(session: str) -> RunInference:
        return SessionRequest(
            request_id="r1", user_id="u", username="user", model="m",
            endpoint="chat.completions", body=json.dumps(chat("alice", "hi")).encode(),
            created_at=NOW, expires_at=NOW + 60, session=session,
        )  # fmt: skip

    key = affinity_key(with_session("s1"))
    assert (key or "").startswith("session:")
    assert affinity_key(with_session("s1")) == key
    assert affinity_key(with_session("s2")) != key
    assert affinity_key(with_session("")) == affinity_key(request(body=chat("alice", "hi")))


def test_the_body_user_is_a_session_per_caller_and_model() -> None:
    key = affinity_key(request(body=chat("alice", "hi")))
    assert (key or "").startswith("user:")
    assert affinity_key(request(body=chat("alice", "other words"))) == key
    assert affinity_key(request(body=chat("bob", "hi"))) != key
    assert affinity_key(request(body=chat("alice", "hi"), user_id="v")) != key
    assert affinity_key(request("m2", body=chat("alice", "hi"))) != key


def test_a_long_shared_prompt_prefix_is_a_key_across_callers() -> None:
    system = "You answer questions about the cluster. " * 30
    assert len(system) >= PREFIX_CHARS
    key = affinity_key(request(body=chat(None, system, "first question")))
    assert (key or "").startswith("prefix:")
    assert affinity_key(request(body=chat(None, system, "another"), user_id="v")) == key
    assert affinity_key(request("m2", body=chat(None, system, "first question"))) != key
    assert affinity_key(request(body=chat(None, "Be brief. " + system))) != key


def test_a_short_prompt_has_no_key() -> None:
    assert affinity_key(request(body=chat(None, "hi"))) is None
    assert affinity_key(request(body=chat(None, "x" * (PREFIX_CHARS - 20)))) is None


def test_prompts_in_every_openai_shape_give_a_prefix_key() -> None:
    long = "y" * PREFIX_CHARS
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": long}]}]}
    for body in ({"prompt": long}, {"prompt": [long, "z"]}, {"prompt": list(range(400))}, parts):
        assert (affinity_key(request(body=body)) or "").startswith("prefix:"), body


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"messages": 5}', b'{"user": 5}', b'{"messages": [7, null]}', b""],
)
def test_bodies_without_a_usable_key_give_none(body: bytes) -> None:
    assert affinity_key(msgspec.structs.replace(request(), body=body)) is None


# the baselines


def test_round_robin_cycles_through_live_hot_sites_in_site_id_order() -> None:
    state = PolicyState()
    sites = [beat("c"), beat("a", running=8, waiting=50), beat("b"), beat("dead", age=TTL)]
    picks = [
        choose_site(request(), sites, NOW, TTL, policy="round_robin", state=state) for _ in range(7)
    ]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_its_turn_when_a_site_leaves() -> None:
    state = PolicyState()
    three = [beat("a"), beat("b"), beat("c")]
    assert choose_site(request(), three, NOW, TTL, policy="round_robin", state=state) == "a"
    assert choose_site(request(), three, NOW, TTL, policy="round_robin", state=state) == "b"
    without_c = three[:2]
    assert choose_site(request(), without_c, NOW, TTL, policy="round_robin", state=state) == "a"


def test_round_robin_turns_are_per_model() -> None:
    state = PolicyState()
    sites = [
        beat("a", models=(status("m"), status("n"))),
        beat("b", models=(status("m"), status("n"))),
    ]
    assert choose_site(request("m"), sites, NOW, TTL, policy="round_robin", state=state) == "a"
    assert choose_site(request("n"), sites, NOW, TTL, policy="round_robin", state=state) == "a"
    assert choose_site(request("m"), sites, NOW, TTL, policy="round_robin", state=state) == "b"


def test_random_covers_every_live_hot_site_and_only_those() -> None:
    state = PolicyState(rng=random.Random(7))
    sites = [
        beat("a"),
        beat("b", running=8, waiting=9),
        beat("c"),
        beat("cold", state="cold"),
        beat("dead", age=TTL),
    ]
    picks = Counter(
        choose_site(request(), sites, NOW, TTL, policy="random", state=state) for _ in range(300)
    )
    assert set(picks) == {"a", "b", "c"}
    assert min(picks.values()) > 60


def test_random_is_reproducible_from_its_seed() -> None:
    sites = [beat("a"), beat("b"), beat("c")]

    def run(seed: int) -> list[str | None]:
        state = PolicyState(rng=random.Random(seed))
        return [
            choose_site(request(), sites, NOW, TTL, policy="random", state=state) for _ in range(20)
        ]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_the_baselines_need_a_state(policy: Policy) -> None:
    with pytest.raises(ValueError, match=policy):
        choose_site(request(), [beat("a")], NOW, TTL, policy=policy)


# choose_start_site


def test_nothing_to_start_without_a_live_allowed_site_listing_the_model() -> None:
    assert choose_start_site(request(), [], NOW, TTL) == NoSite()
    elsewhere = [
        beat("dead", state="cold", age=TTL),
        beat("other", models=(status("n", state="cold"),)),
    ]
    assert choose_start_site(request(), elsewhere, NOW, TTL) == NoSite()
    assert (
        choose_start_site(request(allowed_sites=("x",)), [beat("a", state="cold")], NOW, TTL)
        == NoSite()
    )


def test_a_draining_site_is_not_restarted() -> None:
    assert choose_start_site(request(), [beat("a", state="draining")], NOW, TTL) == NoSite()


def test_a_model_already_starting_is_waited_for() -> None:
    sites = [beat("a", state="cold", max_instances=8), beat("b", state="starting")]
    assert choose_start_site(request(), sites, NOW, TTL) == WaitFor("b")


def test_a_hot_site_is_preferred_to_wait_for_over_a_starting_one() -> None:
    sites = [beat("a", state="starting"), beat("b", state="hot")]
    assert choose_start_site(request(), sites, NOW, TTL) == WaitFor("b")


def test_a_start_on_a_site_the_request_may_not_use_does_not_count() -> None:
    sites = [beat("a", state="cold"), beat("b", state="starting")]
    assert choose_start_site(request(allowed_sites=("a",)), sites, NOW, TTL) == StartOn("a")


def test_the_cold_site_with_the_most_room_for_the_model_is_started() -> None:
    sites = [
        beat("a", state="cold", slots_per_instance=16, max_instances=1),
        beat("b", state="cold", slots_per_instance=8, max_instances=4),
        beat("c", state="cold", slots_per_instance=16, max_instances=2),
        beat("d", state="cold", slots_per_instance=16, max_instances=2),
    ]
    assert choose_start_site(request(), sites, NOW, TTL) == StartOn("b")


def test_among_equal_rooms_the_site_with_fewer_restarts_is_started() -> None:
    sites = [beat("a", state="cold", restarts=3), beat("b", state="cold", restarts=0)]
    assert choose_start_site(request(), sites, NOW, TTL) == StartOn("b")


def test_a_site_that_cannot_start_instances_is_not_asked_to() -> None:
    by_url_only = beat("a", state="cold", max_instances=0, slots_per_instance=64)
    assert choose_start_site(request(), [by_url_only], NOW, TTL) == NoSite()
    assert choose_start_site(
        request(), [by_url_only, beat("b", state="cold")], NOW, TTL
    ) == StartOn("b")


def test_a_cold_site_that_missed_a_heartbeat_is_started_last() -> None:
    sites = [beat("late", state="cold", max_instances=8, age=6.0), beat("ok", state="cold")]
    assert choose_start_site(request(), sites, NOW, TTL) == StartOn("ok")


def test_a_decided_start_is_waited_for_until_heartbeats_can_show_it() -> None:
    state = PolicyState()
    sites = [beat("a", state="cold", max_instances=2), beat("b", state="cold")]
    assert choose_start_site(request(), sites, NOW, TTL, state=state) == StartOn("a")
    assert choose_start_site(request(), sites, NOW + 1, TTL, state=state) == WaitFor("a")
    later = NOW + START_GRACE_S
    assert choose_start_site(request(), sites, later, TTL, state=state) == StartOn("a")


def test_a_decided_start_on_a_site_that_died_is_decided_again() -> None:
    state = PolicyState()
    sites = [beat("a", state="cold", max_instances=2), beat("b", state="cold")]
    assert choose_start_site(request(), sites, NOW, TTL, state=state) == StartOn("a")
    a_dead = [beat("a", state="cold", max_instances=2, age=TTL + 1), sites[1]]
    assert choose_start_site(request(), a_dead, NOW + 1, TTL, state=state) == StartOn("b")
