"""Builders and waits shared by the accounting tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from schemas.messages import UsageRecorded
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
