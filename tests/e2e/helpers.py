"""Reading the ledger from tests, with a bounded wait."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.accounting.ledger import get_usage
from services.common.db import make_engine


async def ledger_row(database_url: str, request_id: str, timeout_s: float = 15.0) -> Any:
    """Return the ledger's row for `request_id`, waiting up to `timeout_s` for it to land."""
    engine = make_engine(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            row = await get_usage(engine, request_id)
            if row is not None:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id} after {timeout_s}s")
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
