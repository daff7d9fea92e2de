"""A batch line as a request: the RunInference it travels as, and its owner's token budget.

Decisions: a line runs at priority `batch`, never streamed, with the batch's expiry as its own
(nobody starts it after that), and the owner's principal as the batch recorded it at create.
Batch lines skip the per-minute limits (they are paced by the batch window instead) but draw
on the owner's and groups' day/month token budgets: when one is spent, the lines not yet
published end with `insufficient_quota` and the batch completes with them in its error file —
an exhausted budget does not come back within a batch's lifetime often enough to wait for it.
"""

from __future__ import annotations

import time

import msgspec
from redis.asyncio import Redis

from schemas.messages import Endpoint, RunInference
from services.access.principal import Principal
from services.access.quotas import Check, plan, refusal
from services.access.settings import AccessSettings, CatalogueModel
from services.gateway.batch_db import BatchRow
from services.gateway.batch_input import URLS, run_body

_groups = msgspec.json.Decoder(list[str])
_model = msgspec.json.Decoder(dict[str, object])


def owner(batch: BatchRow) -> Principal:
    """Return the principal a batch runs as (recorded when it was created)."""
    return Principal(
        user_id=batch.user_id, username=batch.username, groups=tuple(_groups.decode(batch.groups))
    )


def line_job(
    batch: BatchRow,
    body: bytes,
    request_id: str,
    catalogue: dict[str, CatalogueModel],
    reply_to: str,
) -> RunInference | None:
    """Return the line's RunInference (None if its model has left the catalogue)."""
    endpoint: Endpoint = URLS[batch.endpoint]
    run = run_body(body)
    model = str(_model.decode(run).get("model", ""))
    entry = catalogue.get(model)
    if entry is None:
        return None
    who = owner(batch)
    return RunInference(
        request_id=request_id,
        user_id=who.user_id,
        username=who.username,
        groups=who.groups,
        model=model,
        endpoint=endpoint,
        priority="batch",
        stream=False,
        body=run,
        created_at=time.time(),
        expires_at=batch.expires_at or time.time(),
        allowed_sites=tuple(entry.sites),
        reply_to=reply_to,
    )


def budget_checks(principal: Principal, settings: AccessSettings, now: float) -> list[Check]:
    """Return the token budgets a batch line draws on: day and month, not per minute (pure)."""
    return [
        c for c in plan(principal, settings, now) if c.counter == "tokens" and c.period != "minute"
    ]


async def spent_budget(redis: Redis, principal: Principal, settings: AccessSettings) -> str | None:
    """Return why the owner's token budget is spent (the 429's message), None if it is not."""
    now = time.time()
    checks = budget_checks(principal, settings, now)
    if not checks:
        return None
    values = await redis.mget([c.key for c in checks])
    for check, value in zip(checks, values, strict=True):
        used = int(value or 0)
        if used >= check.limit:
            return refusal(check, used, now).message
    return None
