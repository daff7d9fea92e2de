"""The pure lifecycle decisions: start, promote, scale, drain, stop, back off."""

from __future__ import annotations

from typing import Any

from services.site_agent.lifecycle import (
    FAILURE_BACKOFF_S,
    MAX_QUICK_FAILURES,
    Drain,
    InstanceView,
    PoolView,
    Promote,
    Start,
    Stop,
    plan,
)
from services.site_agent.siteconfig import ModelConfig

CONFIG = ModelConfig(
    command=("serve",),
    max_instances=3,
    min_hot=0,
    idle_ttl_s=60,
    scale_up_waiting=4,
    start_timeout_s=100,
)
NOW = 1000.0


def instance(name: str = "i1", **overrides: Any) -> InstanceView:
    values: dict[str, Any] = {
        "instance_id": name,
        "state": "hot",
        "managed": True,
        "healthy": True,
        "alive": True,
        "in_flight": 0,
        "running": 0,
        "waiting": 0,
        "started_at": NOW - 500,
        "idle_since": None,
    }
    values.update(overrides)
    return InstanceView(**values)


def pool(*instances: InstanceView, **overrides: Any) -> PoolView:
    return PoolView(model="m", instances=instances, **overrides)


def test_a_cold_model_with_a_waiting_request_starts_one_instance() -> None:
    actions = plan(pool(held=3), CONFIG, NOW)
    assert len(actions) == 1
    assert isinstance(actions[0], Start)
    assert "waiting for a cold model" in actions[0].reason


def test_a_start_ordered_by_a_router_starts_one_and_then_waits_for_it() -> None:
    assert [type(a) for a in plan(pool(wanted_until=NOW + 10), CONFIG, NOW)] == [Start]
    booting = pool(instance(state="starting", healthy=False, started_at=NOW - 5), held=9)
    assert plan(booting, CONFIG, NOW) == []  # no second start while the first boots


def test_an_idle_cold_model_stays_cold() -> None:
    assert plan(pool(), CONFIG, NOW) == []


def test_a_healthy_starting_instance_is_promoted() -> None:
    starting = instance(state="starting", healthy=True, started_at=NOW - 30)
    assert plan(pool(starting, held=1), CONFIG, NOW) == [Promote("i1")]


def test_a_just_promoted_instance_is_not_drained_in_the_same_breath() -> None:
    starting = instance(state="starting", healthy=True, started_at=NOW - 999, idle_since=NOW - 999)
    assert plan(pool(starting), CONFIG, NOW) == [Promote("i1")]


def test_a_start_that_takes_too_long_is_stopped_as_failed_and_replaced() -> None:
    stuck = instance(state="starting", healthy=False, started_at=NOW - 101)
    actions = plan(pool(stuck, held=1), CONFIG, NOW)
    assert actions[0] == Stop("i1", "not healthy within 100 s", failed=True)
    assert isinstance(actions[1], Start)


def test_a_dead_instance_is_stopped_and_replaced_while_needed() -> None:
    dead = instance(alive=False, healthy=False)
    actions = plan(pool(dead, held=2), CONFIG, NOW)
    assert actions[0] == Stop("i1", "its process or job ended", failed=True)
    assert isinstance(actions[1], Start)
    assert plan(pool(dead), CONFIG, NOW) == [actions[0]]  # not needed: not replaced


def test_min_hot_is_kept_even_without_demand() -> None:
    config = CONFIG.model_copy(update={"min_hot": 2})
    one = instance(idle_since=NOW - 9999)
    actions = plan(pool(one), config, NOW)
    assert [type(a) for a in actions] == [Start]
    assert "min_hot=2" in actions[0].reason  # type: ignore[union-attr]


def test_a_backlog_beyond_the_threshold_adds_one_instance_up_to_the_maximum() -> None:
    busy = [instance(f"i{n}", waiting=5, running=8, in_flight=8) for n in range(2)]
    actions = plan(pool(*busy), CONFIG, NOW)
    assert [type(a) for a in actions] == [Start]
    full = [instance(f"i{n}", waiting=50, running=8, in_flight=8) for n in range(3)]
    assert plan(pool(*full), CONFIG, NOW) == []  # max_instances reached


def test_a_backlog_at_the_threshold_does_not_scale() -> None:
    busy = instance(waiting=4, running=8, in_flight=8)
    assert plan(pool(busy), CONFIG, NOW) == []


def test_an_instance_idle_past_its_ttl_is_drained_then_stopped_when_empty() -> None:
    idle = instance(idle_since=NOW - 61)
    assert plan(pool(idle), CONFIG, NOW) == [Drain("i1", "idle for 60 s")]
    draining = instance(state="draining", in_flight=1, idle_since=None)
    assert plan(pool(draining), CONFIG, NOW) == []
    drained = instance(state="draining", in_flight=0)
    assert plan(pool(drained), CONFIG, NOW) == [Stop("i1", "drained", failed=False)]


def test_idle_instances_are_not_drained_below_need_or_while_requests_wait() -> None:
    config = CONFIG.model_copy(update={"min_hot": 1})
    assert plan(pool(instance(idle_since=NOW - 999)), config, NOW) == []
    assert plan(pool(instance(idle_since=NOW - 59)), CONFIG, NOW) == []
    two = (instance("a", idle_since=NOW - 999), instance("b", idle_since=NOW - 100))
    assert plan(pool(*two), config, NOW) == [Drain("a", "idle for 60 s")]  # longest idle first


def test_configured_urls_count_as_capacity_and_are_never_stopped() -> None:
    static = instance("url", managed=False, alive=True, idle_since=NOW - 9999)
    assert plan(pool(static, held=1), CONFIG, NOW) == []
    assert plan(pool(static), CONFIG.model_copy(update={"min_hot": 0}), NOW) == []


def test_repeated_failed_starts_back_off() -> None:
    failing = pool(held=1, failures=MAX_QUICK_FAILURES, last_failure_at=NOW - 1)
    assert plan(failing, CONFIG, NOW) == []
    later = NOW + FAILURE_BACKOFF_S
    assert [type(a) for a in plan(failing, CONFIG, later)] == [Start]


def test_a_model_without_a_command_is_never_started() -> None:
    config = ModelConfig(urls=("http://x",))
    assert plan(pool(held=5), config, NOW) == []
