"""choose_site: pure decisions, no event loop, no broker."""

from __future__ import annotations

import msgspec

from schemas.messages import ModelState, ModelStatus, RunInference, SiteHeartbeat
from services.router.policy import choose_site, free_capacity

NOW = 1_000_000.0
TTL = 15.0


def request(model: str = "m") -> RunInference:
    return RunInference(
        request_id="r1",
        user_id="u",
        username="user",
        model=model,
        endpoint="chat.completions",
        body=b"{}",
        created_at=NOW,
        expires_at=NOW + 60,
    )


def beat(
    site_id: str,
    *,
    age: float = 1.0,
    model: str = "m",
    state: ModelState = "hot",
    capacity: int = 8,
    running: int = 0,
    waiting: int = 0,
) -> SiteHeartbeat:
    status = ModelStatus(
        model=model,
        state=state,
        instances=1,
        running=running,
        waiting=waiting,
        capacity=capacity,
    )
    return SiteHeartbeat(
        site_id=site_id, agent_id="a", sent_at=NOW - age, interval_s=2.0, models=(status,)
    )


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


def test_only_hot_models_count() -> None:
    for state in ("cold", "starting", "draining"):
        assert choose_site(request(), [beat("a", state=state)], NOW, TTL) is None


def test_site_without_the_model_is_skipped() -> None:
    sites = [beat("a", model="other", capacity=100), beat("b", running=6)]
    assert choose_site(request(), sites, NOW, TTL) == "b"


def test_most_free_capacity_wins() -> None:
    sites = [
        beat("a", capacity=8, running=6),
        beat("b", capacity=8, running=2, waiting=1),
        beat("c", capacity=16, running=12),
    ]
    assert choose_site(request(), sites, NOW, TTL) == "b"


def test_overloaded_sites_still_rank_by_free_capacity() -> None:
    sites = [beat("a", capacity=8, running=8, waiting=5), beat("b", capacity=8, waiting=9)]
    assert choose_site(request(), sites, NOW, TTL) == "b"


def test_ties_go_to_the_smallest_site_id_whatever_the_order() -> None:
    sites = [beat("c"), beat("a"), beat("b")]
    assert choose_site(request(), sites, NOW, TTL) == "a"
    assert choose_site(request(), list(reversed(sites)), NOW, TTL) == "a"


def test_sent_but_unreflected_work_counts_against_a_site() -> None:
    sites = [beat("a", capacity=8, running=1), beat("b", capacity=8, running=3)]
    assert choose_site(request(), sites, NOW, TTL, sent={"a": 1}) == "a"
    assert choose_site(request(), sites, NOW, TTL, sent={"a": 3}) == "b"
    assert choose_site(request(), sites, NOW, TTL, sent={"zzz": 99}) == "a"


def test_free_capacity_subtracts_everything() -> None:
    status = beat("a", capacity=10, running=3, waiting=2).models[0]
    assert free_capacity(status) == 5
    assert free_capacity(status, 7) == -2


def test_only_the_catalogues_allowed_sites_are_candidates() -> None:
    restricted = msgspec.structs.replace(request(), allowed_sites=("busy",))
    sites = [beat("roomy", capacity=64), beat("busy", capacity=8, running=8)]
    assert choose_site(restricted, sites, NOW, TTL) == "busy"
    assert choose_site(request(), sites, NOW, TTL) == "roomy"
    nowhere = msgspec.structs.replace(request(), allowed_sites=("elsewhere",))
    assert choose_site(nowhere, sites, NOW, TTL) is None
