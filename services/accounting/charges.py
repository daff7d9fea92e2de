"""Charge billed tokens to the quota counters the gateway enforces (`names.quota_key`).

Called once per usage event, after its ledger row was written for the first time (a duplicate
is never charged again), so budgets follow the ledger: a stream cut by a disconnect is charged
the tokens it delivered. The counters are an enforcement cache, the ledger stays the truth:
if Redis is down when a row is written, that usage is missing from the counters (the request
is under-charged, never charged twice) and a warning says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from schemas import names
from schemas.messages import UsageRecorded

logger = logging.getLogger(__name__)

PERIODS: tuple[names.QuotaPeriod, ...] = ("minute", "day", "month")


def charges(events: Sequence[UsageRecorded], at: float) -> dict[str, tuple[int, int]]:
    """Return, per counter key, the tokens to add for `events` and the key's TTL (pure)."""
    out: dict[str, tuple[int, int]] = {}
    for event in events:
        tokens = event.prompt_tokens + event.completion_tokens
        if tokens <= 0:
            continue
        subjects: list[tuple[names.QuotaScope, str]] = [("user", event.user_id)]
        subjects += [("group", group) for group in event.groups]
        for scope, subject in subjects:
            for period in PERIODS:
                key = names.quota_key("tokens", scope, subject, period, at)
                before = out.get(key, (0, 0))[0]
                out[key] = (before + tokens, names.QUOTA_TTL_S[period])
    return out


async def charge(redis: Redis, events: Sequence[UsageRecorded], at: float) -> None:
    """Add the events' tokens to their counters in one round trip (INCRBY + EXPIRE each).

    Raises redis' errors: the caller logs them and goes on (the ledger row is already written).
    """
    todo = charges(events, at)
    if not todo:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for key, (tokens, ttl_s) in todo.items():
            pipe.incrby(key, tokens)
            pipe.expire(key, ttl_s)
        await pipe.execute()
