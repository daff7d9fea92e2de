"""Builders and waits shared by the accounting tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.messages import UsageRecorded
from services.accounting.ledger import usage_ledger
from services.common.ids import new_request_id

T = TypeVar("T")


def make_usage(**overrides: Any) -> UsageRecorded:
    """Return a completed interactive request's usage; `overrides` replace any field."""
    fields: dict[str, Any] = {
        "request_id": new_request_id(),
        "user_id": "u-alice",
        "username": "alice@example.org",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "site_id": "local",
        "endpoint": "chat.completions",
        "priority": "interactive",
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "outcome": "completed",
        "created_at": 1_709_337_600.25,
        "finished_at": 1_709_337_601.5,
    }
    fields.update(overrides)
    return UsageRecorded(**fields)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 20.0, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something other than None, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(0.05)


async def count_rows(engine: AsyncEngine, request_ids: Iterable[str] | None = None) -> int:
    """Count the ledger's rows, or those of `request_ids`."""
    query = sa.select(sa.func.count()).select_from(usage_ledger)
    if request_ids is not None:
        query = query.where(usage_ledger.c.request_id.in_(list(request_ids)))
    async with engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


BATCH_HISTOGRAM = "first_accounting_ledger_batch_events"


def _batch_samples() -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in REGISTRY.collect()
        if metric.name == BATCH_HISTOGRAM
        for sample in metric.samples
    }


class Batches:
    """Ledger transactions committed since this was made (the batch histogram's deltas)."""

    def __init__(self) -> None:
        self._start = _batch_samples()

    def _delta(self, suffix: str, le: str = "") -> float:
        key = (f"{BATCH_HISTOGRAM}_{suffix}", le)
        return _batch_samples().get(key, 0.0) - self._start.get(key, 0.0)

    def since(self) -> tuple[float, float]:
        """Return (transactions, events in them) since this was made."""
        return self._delta("count"), self._delta("sum")

    def within(self, events: int) -> float:
        """Return how many of those transactions held at most `events` events."""
        return self._delta("bucket", str(float(events)))
