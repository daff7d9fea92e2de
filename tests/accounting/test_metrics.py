"""Accounting's series: each settled event by result, each ledger write timed; one log line each."""

from __future__ import annotations

from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.accounting.helpers import eventually, make_usage
from tests.accounting.test_handlers import _send, running_consumer
from tests.common.helpers import capture_json


def sample(name: str, result: str) -> float:
    return REGISTRY.get_sample_value(name, {"result": result}) or 0.0


def counts() -> dict[str, float]:
    return {
        "recorded": sample("first_accounting_usage_events_total", "recorded"),
        "duplicate": sample("first_accounting_usage_events_total", "duplicate"),
        "writes_recorded": sample("first_accounting_ledger_write_seconds_count", "recorded"),
        "writes_duplicate": sample("first_accounting_ledger_write_seconds_count", "duplicate"),
    }


async def test_a_write_and_its_duplicate_are_timed_and_counted_and_logged_with_their_ids(
    rabbit_url: str, sqlite_ledger: AsyncEngine
) -> None:
    event = make_usage(prompt_tokens=21, completion_tokens=8)
    before = counts()
    with capture_json() as logs:
        async with running_consumer(rabbit_url, sqlite_ledger) as broker:
            await _send(broker, event)
            await _send(broker, event)

            async def settled() -> bool | None:
                return counts()["duplicate"] == before["duplicate"] + 1 or None

            await eventually(settled, what="the duplicate settled")
    after = counts()
    assert {key: after[key] - before[key] for key in after} == dict.fromkeys(after, 1.0)
    assert sample("first_accounting_ledger_write_seconds_sum", "recorded") > 0
    mine = [line for line in logs.lines() if line.get("request_id") == event.request_id]
    assert [line["msg"].split(":")[0] for line in mine] == ["usage recorded", "usage duplicate"]
    assert all(line["user_id"] == event.user_id for line in mine)
    assert all(line["site_id"] == event.site_id for line in mine)
    assert "21 prompt + 8 completion tokens" in mine[0]["msg"]
