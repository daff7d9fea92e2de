"""Which heartbeats the router believes, and on whose clock (pure decisions)."""

from __future__ import annotations

from schemas.messages import ModelStatus, SiteHeartbeat
from services.gateway.registry import serving_sites
from services.router.heartbeats import refusal, stamp
from services.router.policy import is_live

NOW = 1_000_000.0
TTL = 15.0


def beat(site_id: str = "a", sent_at: float = NOW, received_at: float = 0.0) -> SiteHeartbeat:
    status = ModelStatus(model="m", state="hot", instances=1, running=0, waiting=0, capacity=8)
    return SiteHeartbeat(
        site_id=site_id,
        agent_id="x",
        sent_at=sent_at,
        interval_s=2.0,
        models=(status,),
        received_at=received_at,
    )


def users(site_id: str) -> frozenset[str]:
    return frozenset([f"first-site-{site_id}"])


def test_a_heartbeat_counts_only_from_its_own_sites_user() -> None:
    assert refusal(beat("a"), "first-site-a", users) is None
    assert refusal(beat("a"), "first-site-b", users) == "publisher"
    assert refusal(beat("a"), None, users) == "publisher"  # no user_id: nobody vouches
    assert refusal(beat("a.b"), "first-site-a.b", users) == "site_id"
    assert refusal(beat(""), "first-site-", users) == "site_id"


def test_stamping_sets_the_receive_time_and_clamps_the_senders_clock() -> None:
    future = stamp(beat(sent_at=NOW + 1e9), NOW, 5.0)
    assert (future.received_at, future.sent_at) == (NOW, NOW + 5.0)
    past = stamp(beat(sent_at=NOW - 1e9), NOW, 5.0)
    assert past.sent_at == NOW - 5.0
    honest = stamp(beat(sent_at=NOW - 0.2), NOW, 5.0)
    assert honest.sent_at == NOW - 0.2


def test_liveness_is_judged_by_receive_time_never_by_sent_at() -> None:
    assert is_live(beat(sent_at=NOW + 1e9, received_at=NOW - TTL - 1), NOW, TTL) is False
    assert is_live(beat(sent_at=NOW - 1e9, received_at=NOW - 1), NOW, TTL) is True
    assert is_live(beat(sent_at=NOW), NOW, TTL) is False  # never stamped by a router


def test_the_gateway_reads_the_mirror_by_receive_time_too() -> None:
    stale = beat("a", sent_at=NOW + 1e9, received_at=NOW - TTL - 1)
    fresh = beat("b", sent_at=NOW - 1e9, received_at=NOW - 1)
    assert serving_sites([stale, fresh], "m", NOW, TTL, []) == [fresh]
