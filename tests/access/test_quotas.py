"""Rate limits and token budgets: counted in Redis, so they hold across gateway replicas."""

from __future__ import annotations

import asyncio
import calendar
import time
from typing import Any

from schemas import names
from schemas.messages import UsageRecorded
from services.access.errors import QuotaExceeded, RateLimited
from services.access.principal import Principal
from services.access.quotas import plan, refusal, seconds_left
from services.access.settings import AccessSettings, Limits
from services.accounting.charges import charge, charges
from tests.gateway.conftest import ApiKeyFor, MakeGateway, Replica, live_site

MODEL = "smollm2-135m"


def chat() -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def usage(user_id: str, tokens: int, groups: tuple[str, ...] = ()) -> UsageRecorded:
    return UsageRecorded(
        request_id="r",
        user_id=user_id,
        username=user_id,
        model=MODEL,
        site_id="s1",
        endpoint="chat.completions",
        prompt_tokens=tokens // 2,
        completion_tokens=tokens - tokens // 2,
        outcome="completed",
        created_at=0.0,
        finished_at=0.0,
        groups=groups,
    )


# ---------------------------------------------------------------------- pure parts


def test_the_plan_takes_the_users_override_and_every_limited_group() -> None:
    settings = AccessSettings(
        user_limits=Limits(requests_per_minute=10),
        user_limit_overrides={"vip": Limits(tokens_per_day=5)},
        group_limits={"g1": Limits(tokens_per_month=100), "g2": Limits()},
    )
    now = 1_000_000.0
    alice = plan(Principal(user_id="alice", username="a", groups=("g1", "g2", "g3")), settings, now)
    assert [(c.scope, c.subject, c.counter, c.period, c.limit) for c in alice] == [
        ("user", "alice", "requests", "minute", 10),
        ("group", "g1", "tokens", "month", 100),
    ]
    vip = plan(Principal(user_id="vip", username="v"), settings, now)
    assert [(c.counter, c.period, c.limit) for c in vip] == [("tokens", "day", 5)]
    assert vip[0].key == names.quota_key("tokens", "user", "vip", "day", now)


def test_windows_end_at_the_next_utc_minute_day_and_month() -> None:
    now = calendar.timegm((2026, 12, 31, 23, 59, 30))
    assert seconds_left("minute", now) == 30
    assert seconds_left("day", now) == 30
    assert seconds_left("month", now) == 30
    mid = calendar.timegm((2026, 2, 10, 12, 0, 0))
    assert seconds_left("day", mid) == 12 * 3600
    assert seconds_left("month", mid) == (18 * 24 + 12) * 3600


def test_per_minute_limits_are_rate_limits_and_budgets_are_quota() -> None:
    settings = AccessSettings(user_limits=Limits(requests_per_minute=1, tokens_per_day=1))
    rpm, day = plan(Principal(user_id="u", username="u"), settings, 0.0)
    assert isinstance(refusal(rpm, 1, 0.0), RateLimited)
    assert isinstance(refusal(day, 1, 0.0), QuotaExceeded)


def test_charges_add_tokens_to_the_user_and_each_group_in_every_period() -> None:
    at = 1_000_000.0
    todo = charges([usage("u", 30, ("g",)), usage("u", 10), usage("z", 0)], at)
    assert todo[names.quota_key("tokens", "user", "u", "minute", at)] == (40, 120)
    assert todo[names.quota_key("tokens", "user", "u", "month", at)][0] == 40
    assert todo[names.quota_key("tokens", "group", "g", "day", at)][0] == 30
    assert len(todo) == 6  # nothing for a request that billed no tokens


# ---------------------------------------------------------- through two replicas


async def two_replicas(make_gateway: MakeGateway, **overrides: Any) -> tuple[Replica, Replica]:
    # first_record_timeout_s: admitted requests are published, and nobody serves them here.
    first = await make_gateway(first_record_timeout_s=0.5, **overrides)
    second = await make_gateway(first_record_timeout_s=0.5, **overrides)
    await live_site(first.redis, [MODEL])
    return first, second


async def test_requests_per_minute_hold_in_total_across_two_replicas(
    make_gateway: MakeGateway, api_key_for: ApiKeyFor
) -> None:
    first, second = await two_replicas(make_gateway, user_limits=Limits(requests_per_minute=5))
    key = await api_key_for(first, "alice")
    now = time.time()
    if 60 - now % 60 < 5:  # keep the burst inside one minute window
        await asyncio.sleep(60 - now % 60 + 0.1)
        now = time.time()  # the counter checked below is the new minute's
    replies = await asyncio.gather(
        *(
            (first if i % 2 else second).client.post(
                "/v1/chat/completions", json=chat(), headers=bearer(key)
            )
            for i in range(12)
        )
    )
    limited = [r for r in replies if r.status_code == 429]
    assert len(limited) == 7, [r.status_code for r in replies]
    assert all(r.status_code == 504 for r in replies if r.status_code != 429)  # admitted
    error = limited[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"]
    assert 1 <= int(limited[0].headers["retry-after"]) <= 60
    counter = names.quota_key("requests", "user", "alice", "minute", now)
    assert int(await first.redis.get(counter) or 0) == 5  # refusals counted nothing


async def test_a_spent_token_budget_refuses_until_the_window_ends(
    make_gateway: MakeGateway, api_key_for: ApiKeyFor
) -> None:
    first, second = await two_replicas(make_gateway, user_limits=Limits(tokens_per_day=100))
    key = await api_key_for(first, "bob")
    await charge(first.redis, [usage("bob", 60)], time.time())
    reply = await second.client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert reply.status_code == 504  # under budget: admitted
    assert len(reply.headers["x-request-id"]) == 32  # published: the client can name it
    await charge(first.redis, [usage("bob", 40)], time.time())
    for replica in (first, second):
        reply = await replica.client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert reply.status_code == 429
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert "tokens per day" in error["message"]


async def test_a_groups_shared_allocation_counts_every_members_usage(
    make_gateway: MakeGateway,
) -> None:
    settings = AccessSettings(group_limits={"lab": Limits(tokens_per_month=50)})
    at = time.time()
    replica = await make_gateway()
    await charge(replica.redis, [usage("u1", 30, ("lab",)), usage("u2", 30, ("lab",))], at)
    (check,) = plan(Principal(user_id="u3", username="u3", groups=("lab",)), settings, at)
    assert int(await replica.redis.get(check.key) or 0) == 60 >= check.limit


async def test_usage_shows_the_callers_usage_and_what_is_left(
    make_gateway: MakeGateway, api_key_for: ApiKeyFor
) -> None:
    replica = await make_gateway(user_limits=Limits(requests_per_minute=100, tokens_per_day=1000))
    key = await api_key_for(replica, "carol")
    admin = await api_key_for(replica, "root", admin=True)
    await charge(replica.redis, [usage("carol", 250)], time.time())
    reply = await replica.client.get("/v1/usage", headers=bearer(key))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["user_id"] == "carol"
    limits = {(x["counter"], x["period"]): x for x in body["limits"]}
    assert limits["tokens", "day"]["used"] == 250
    assert limits["tokens", "day"]["remaining"] == 750
    assert limits["requests", "minute"]["limit"] == 100
    assert set(body["usage"]["day"]) == {
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    }
    # Others' usage is for admins only.
    other = await replica.client.get("/v1/usage?user=root", headers=bearer(key))
    assert other.status_code == 403
    as_admin = await replica.client.get("/v1/usage?user=carol", headers=bearer(admin))
    assert as_admin.status_code == 200
    seen = {(x["counter"], x["period"]): x["used"] for x in as_admin.json()["limits"]}
    assert seen["tokens", "day"] == 250
