"""Files and batches through the unmodified `openai` SDK, over a whole stack on the simulated vLLM.

Every test runs the stack as processes (gateway, batch worker, router, site agent, accounting)
on its own vhost and Redis, and reads results back through the API and the ledger.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Batch

from services.access.apikeys import issue_key
from services.accounting.reports import usage_report
from services.common.db import make_engine
from tests.faults.conftest import MODEL, FaultStack, MakeStack, wait_ledger
from tests.faults.conftest import make_fault_stack as make_fault_stack  # the fixture

WITH_WORKER = ("accounting", "router", "site_agent", "gateway", "batch_worker")
ENDED = ("completed", "failed", "expired", "cancelled")
FIRST = str(Path(sys.executable).parent / "first")
"""The `first` command of this environment."""


def client(stack: FaultStack, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=stack.config.base_url, api_key=key or stack.api_key, max_retries=0, timeout=30
    )


def jsonl(n: int, max_tokens: int = 8, start: int = 0) -> bytes:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"prompt {i}"}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(start, start + n)
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


async def submit(sdk: openai.AsyncOpenAI, data: bytes) -> Batch:
    upload = await sdk.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
    return await sdk.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "test"},
    )


async def until(
    sdk: openai.AsyncOpenAI, batch_id: str, statuses: tuple[str, ...], within_s: float = 60
) -> Batch:
    """Poll the batch until its status is one of `statuses` (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {within_s} s")
        await asyncio.sleep(0.2)


async def lines_of(sdk: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await sdk.files.content(file_id)
    return [json.loads(x) for x in content.content.splitlines()]


async def test_the_openai_sdk_runs_a_batch_and_every_line_is_billed_once_as_batch(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(services=WITH_WORKER, env={"FIRST_GATEWAY_BATCH_POLL_S": "0.2"})
    sdk = client(stack)
    created = await submit(sdk, jsonl(24))
    assert created.status == "validating"
    assert created.metadata == {"project": "test"}
    done = await until(sdk, created.id, ENDED)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (24, 24)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at  # type: ignore[operator]
    assert done.error_file_id is None
    outputs = await lines_of(sdk, done.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"line-{i}" for i in range(24))
    for out in outputs:
        assert out["error"] is None
        assert out["response"]["status_code"] == 200
        assert out["response"]["body"]["choices"][0]["message"]["content"]
    request_ids = [o["response"]["request_id"] for o in outputs]
    rows = await wait_ledger(stack.database_url, request_ids)
    assert {r.priority for r in rows.values()} == {"batch"}
    assert sum(r.completion_tokens for r in rows.values()) == sum(
        o["response"]["body"]["usage"]["completion_tokens"] for o in outputs
    )
    assert await stack.ledger_count() == 24
    # Reports separate batch from interactive usage.
    interactive = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "now"}], max_tokens=4
    )
    await wait_ledger(stack.database_url, [interactive.id.removeprefix("chatcmpl-")], 10)
    engine = make_engine(stack.database_url)
    try:
        kinds = {r.key: r.requests for r in await usage_report(engine, "kind")}
    finally:
        await engine.dispose()
    assert kinds == {"batch": 24, "interactive": 1}
    listed = await sdk.batches.list(limit=10)
    assert [b.id for b in listed.data] == [created.id]
    with pytest.raises(openai.BadRequestError):
        await sdk.batches.cancel(created.id)  # a completed batch cannot be cancelled


async def test_a_bad_file_is_refused_naming_its_line_and_others_batches_are_not_found(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(services=WITH_WORKER)
    sdk = client(stack)
    bad = jsonl(2) + b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}\n'
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
    assert "Line 3" in caught.value.message
    assert (await sdk.files.list()).data == []
    mine = await submit(sdk, jsonl(2))
    other = client(stack, await issue_key(stack.database_url, "someone-else"))
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await other.files.content(mine.input_file_id)
    with pytest.raises(openai.NotFoundError):
        await other.batches.cancel(mine.id)
    assert (await other.batches.list()).data == []
    # Pages: newest first, `after` continues.
    more = [await submit(sdk, jsonl(1, start=k)) for k in range(2)]
    first = await sdk.batches.list(limit=2)
    assert [b.id for b in first.data] == [more[1].id, more[0].id]
    assert first.has_more
    rest = await sdk.batches.list(limit=2, after=more[0].id)
    assert [b.id for b in rest.data] == [mine.id]
    assert not rest.has_more


SLOW = {"tokens_per_s": 20, "slots": 4}
"""Each 20-token line takes ~1 s and four run at once: a 40-line batch lasts ~10 s."""


async def test_a_cancelled_batch_returns_what_finished_and_marks_the_rest(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(
        services=WITH_WORKER,
        sim=SLOW,
        env={"FIRST_GATEWAY_BATCH_POLL_S": "0.2", "FIRST_GATEWAY_BATCH_CANCEL_GRACE_S": "5"},
    )
    sdk = client(stack)
    batch = await submit(sdk, jsonl(40, max_tokens=20))
    await until(sdk, batch.id, ("in_progress",))
    deadline = time.monotonic() + 30
    while (await sdk.batches.retrieve(batch.id)).request_counts.completed < 4:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no line finished"
        await asyncio.sleep(0.2)
    cancelling = await sdk.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    ended = await until(sdk, batch.id, ENDED, 30)
    assert ended.status == "cancelled"
    assert ended.in_progress_at <= ended.cancelling_at <= ended.cancelled_at  # type: ignore[operator]
    outputs = await lines_of(sdk, ended.output_file_id)
    errors = await lines_of(sdk, ended.error_file_id)
    assert len(outputs) >= 4
    assert errors, "a 10 s batch cancelled after ~1 s left lines that never ran"
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sorted(x["custom_id"] for x in outputs + errors) == sorted(
        f"line-{i}" for i in range(40)
    )
    assert (await sdk.batches.cancel(batch.id)).status == "cancelled"  # cancel is idempotent


async def test_an_expired_batch_returns_what_finished_and_marks_the_rest_expired(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(
        services=WITH_WORKER,
        sim=SLOW,
        env={"FIRST_GATEWAY_BATCH_POLL_S": "0.2", "FIRST_GATEWAY_BATCH_EXPIRY_S": "4"},
    )
    sdk = client(stack)
    batch = await submit(sdk, jsonl(40, max_tokens=20))
    ended = await until(sdk, batch.id, ENDED, 30)
    assert ended.status == "expired"
    assert ended.expires_at <= ended.expired_at  # type: ignore[operator]
    outputs = await lines_of(sdk, ended.output_file_id)
    errors = await lines_of(sdk, ended.error_file_id)
    assert outputs, "lines that finished within 4 s are returned"
    assert len(errors) >= 20, "a 10 s batch cannot have finished in 4 s"
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(x["custom_id"] for x in outputs + errors) == sorted(
        f"line-{i}" for i in range(40)
    )
    assert ended.request_counts is not None
    assert ended.request_counts.completed == len(outputs)


async def test_a_batch_survives_restarts_and_runs_every_line_exactly_once(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(
        services=WITH_WORKER,
        sim=SLOW,
        env={
            "FIRST_GATEWAY_BATCH_POLL_S": "0.2",
            "FIRST_GATEWAY_BATCH_SWEEP_AFTER_S": "3",
            "FIRST_GATEWAY_BATCH_REPUBLISH_AFTER_S": "6",
        },
    )
    sdk = client(stack)
    batch = await submit(sdk, jsonl(30, max_tokens=20))
    await until(sdk, batch.id, ("in_progress",))
    await asyncio.sleep(2.0)  # some lines done, some generating, the rest held or pending
    for name in ("batch_worker", "gateway", "router"):
        stack.kill(name)
    await asyncio.sleep(1.0)  # replies of lines that finish meanwhile wait in RabbitMQ
    for name in ("router", "gateway", "batch_worker"):
        stack.start(name)
    ended = await until(sdk, batch.id, ENDED, 90)
    assert ended.status == "completed"
    assert ended.request_counts is not None
    assert (ended.request_counts.completed, ended.request_counts.failed) == (30, 0)
    outputs = await lines_of(sdk, ended.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"line-{i}" for i in range(30))
    request_ids = {o["response"]["request_id"] for o in outputs}
    assert len(request_ids) == 30
    rows = await wait_ledger(stack.database_url, sorted(request_ids))
    assert len(rows) == 30
    assert await stack.ledger_count() == 30  # no line billed twice or under another id


async def test_first_batch_submit_uploads_follows_and_downloads_the_results(
    make_fault_stack: MakeStack, tmp_path: Path
) -> None:
    stack = await make_fault_stack(services=WITH_WORKER, env={"FIRST_GATEWAY_BATCH_POLL_S": "0.2"})
    source = tmp_path / "prompts.jsonl"
    source.write_bytes(jsonl(12))
    env = os.environ | {"FIRST_API_KEY": stack.api_key, "FIRST_BASE_URL": stack.config.base_url}
    run = await asyncio.create_subprocess_exec(
        FIRST, "batch", "submit", str(source), "--poll-s", "0.2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(run.communicate(), 60)
    assert run.returncode == 0, stderr.decode()
    outputs = [json.loads(x) for x in (tmp_path / "prompts.output.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"line-{i}" for i in range(12))
    assert {o["response"]["status_code"] for o in outputs} == {200}
    assert not (tmp_path / "prompts.errors.jsonl").exists()
    assert "completed: 12 results" in stderr.decode()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(1) + b"{oops\n")
    refused = await asyncio.create_subprocess_exec(
        FIRST, "batch", "submit", str(bad),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(refused.communicate(), 30)
    assert refused.returncode == 1
    assert "Line 2" in stderr.decode()
