"""Direct queue producers: a RabbitMQ user that may write only to `first.ingress`, a router
that admits its messages exactly as the gateway would, and results read from Redis.

Real RabbitMQ (a vhost and a producer user of this module's own), real Redis, SQLite for the
keys; the site agent forwards to the fake vLLM backend.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.exceptions import ChannelClosed
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from schemas import names
from schemas.codec import encode
from schemas.messages import IngressRequest, RunInference
from schemas.records import Failure
from services.access.settings import Limits
from services.common.ids import new_request_id
from services.producer.client import READER_ACL, Producer
from tests.producer.conftest import Deployment, _with_user, chat, publish_as
from tests.site_agent.helpers import (
    amqp,
    queue_depth,
    stream_records,
    tap,
    unique,
)


async def test_a_producer_with_write_only_rights_gets_every_result(
    deployment: Deployment,
) -> None:
    d = deployment
    async with amqp(d.rabbit_url) as channel:
        usage = await tap(channel, names.USAGE_EXCHANGE)
        async with Producer(d.producer_url, d.redis_url, d.key, window=8) as producer:
            ids = [await producer.submit("chat.completions", chat(d.model)) for _ in range(20)]
            results = await asyncio.gather(*(producer.result(i, timeout_s=20) for i in ids))
        for result in results:
            assert (result.status, result.outcome, result.error) == (200, "completed", None)
            assert result.json()["choices"][0]["message"]["content"]
        billed = [(await usage.get())[0] for _ in ids]
    assert {getattr(u, "request_id", None) for u in billed} == set(ids)
    assert {(getattr(u, "user_id", None), getattr(u, "username", None)) for u in billed} == {
        ("pipeline", "pipeline")
    }


async def test_an_unauthenticated_message_is_dead_lettered_with_its_reason_and_not_served(
    deployment: Deployment,
) -> None:
    d = deployment
    async with amqp(d.rabbit_url) as channel:
        dead = await tap(channel, names.DEAD_EXCHANGE)
        site = await tap(channel, names.SITES_EXCHANGE)
        usage = await tap(channel, names.USAGE_EXCHANGE)
        async with Producer(d.producer_url, d.redis_url, "first-not-a-key-at-all") as producer:
            request_id = await producer.submit("chat.completions", chat(d.model))
            result = await producer.result(request_id, timeout_s=10)
        assert result.error is not None
        assert (result.status, result.error.code) == (401, "invalid_api_key")
        copy = await dead.get_raw()
        assert copy.message_id == request_id
        assert copy.headers[names.REASON_HEADER] == "invalid_api_key"
        assert names.CREDENTIAL_HEADER not in copy.headers  # never kept anywhere
        await asyncio.sleep(0.5)
        assert await site.empty()
        assert await usage.empty()


@pytest.mark.parametrize("deployment", [Limits(requests_per_minute=3)], indirect=True)
async def test_an_over_quota_producer_is_refused_like_an_http_client(
    deployment: Deployment,
) -> None:
    d = deployment
    if 60 - time.time() % 60 < 5:  # keep the burst inside one minute window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    async with Producer(d.producer_url, d.redis_url, d.key) as producer:
        ids = [await producer.submit("chat.completions", chat(d.model)) for _ in range(5)]
        results = [await producer.result(i, timeout_s=20) for i in ids]
    codes = sorted((r.error.code if r.error else "ok") or "" for r in results)
    assert codes == ["ok", "ok", "ok", "rate_limit_exceeded", "rate_limit_exceeded"]


async def test_a_bad_model_or_body_is_refused_naming_the_field(deployment: Deployment) -> None:
    d = deployment
    async with Producer(d.producer_url, d.redis_url, d.key) as producer:
        unknown = await producer.submit("chat.completions", chat("no-such-model"))
        broken = await producer.submit("chat.completions", {"model": d.model})
        results = [await producer.result(i, timeout_s=10) for i in (unknown, broken)]
    assert results[0].error is not None
    assert results[0].error.code == "model_not_found"
    assert results[1].error is not None
    assert (results[1].status, results[1].error.param) == (400, "messages")


@pytest.fixture
async def stream_reader(deployment: Deployment) -> AsyncIterator[str]:
    """A Redis user with the producer ACL (`READER_ACL`), on the deployment's database."""
    user, password = unique("reader"), secrets.token_urlsafe(12)
    async with Redis.from_url(deployment.redis_url) as admin:
        await admin.execute_command("ACL", "SETUSER", user, f">{password}", *READER_ACL)
        parts = urllib.parse.urlsplit(deployment.redis_url)
        netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
        try:
            yield urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        finally:
            await admin.execute_command("ACL", "DELUSER", user)


async def test_a_redis_user_that_may_only_read_streams_gets_results_and_nothing_else(
    deployment: Deployment, stream_reader: str
) -> None:
    d = deployment
    async with Producer(d.producer_url, stream_reader, d.key) as producer:
        result = await producer.result(
            await producer.submit("chat.completions", chat(d.model)), timeout_s=20
        )
    assert (result.status, result.outcome) == (200, "completed")
    async with Redis.from_url(stream_reader) as reader:
        for command in (
            ("GET", "first:apikey:x"),
            ("KEYS", "*"),
            ("XADD", "first:stream:x", "*", "a", "b"),
        ):
            with pytest.raises(NoPermissionError):
                await reader.execute_command(*command)


async def test_with_a_reply_queue_every_result_comes_back_there_and_no_redis_is_needed(
    deployment: Deployment,
) -> None:
    d = deployment
    async with Producer(
        d.producer_url, None, d.key, window=8, reply_queue=unique("results")
    ) as producer:
        assert producer.reply_to.startswith(names.reply_queue_prefix(d.producer_user))
        ids = [await producer.submit("chat.completions", chat(d.model)) for _ in range(10)]
        streamed = await producer.submit("chat.completions", chat(d.model) | {"stream": True})
        results = await asyncio.gather(*(producer.result(i, timeout_s=20) for i in ids))
        chunks = await producer.result(streamed, timeout_s=20)
    assert [r.request_id for r in results] == ids
    for result in results:
        assert (result.status, result.outcome, result.error) == (200, "completed", None)
        assert result.json()["choices"][0]["message"]["content"]
        assert result.usage.completion_tokens > 0
    assert (chunks.status, chunks.outcome, chunks.body) == (200, "completed", b"")
    assert len(chunks.chunks) >= 2
    assert json.loads(chunks.chunks[0])["object"] == "chat.completion.chunk"


async def test_a_refused_request_is_answered_on_the_reply_queue_too(
    deployment: Deployment,
) -> None:
    d = deployment
    queue = unique("results")
    async with Producer(d.producer_url, None, "first-wrong", reply_queue=queue) as producer:
        result = await producer.result(
            await producer.submit("chat.completions", chat(d.model)), timeout_s=10
        )
    assert result.error is not None
    assert (result.status, result.outcome, result.error.code) == (401, "failed", "invalid_api_key")


async def test_a_reply_queue_that_is_not_the_producers_own_is_refused_and_not_served(
    deployment: Deployment,
) -> None:
    """A producer must not have results sent to (and so read by) another producer's queue."""
    d = deployment
    request = IngressRequest(
        request_id=new_request_id(),
        endpoint="chat.completions",
        body=json.dumps(chat(d.model)).encode(),
        reply_to=names.reply_queue_prefix("someone-else") + "results",
    )
    async with amqp(d.rabbit_url) as channel:
        dead = await tap(channel, names.DEAD_EXCHANGE)
        site = await tap(channel, names.SITES_EXCHANGE)
        message = aio_pika.Message(
            encode(request), user_id=d.producer_user, headers={names.CREDENTIAL_HEADER: d.key}
        )
        await publish_as(d.producer_url, names.INGRESS_EXCHANGE, names.INGRESS_ROUTING_KEY, message)
        copy = await dead.get_raw()
        assert copy.headers[names.REASON_HEADER] == "invalid_reply_to"
        async with Redis.from_url(d.redis_url) as redis:
            records = await stream_records(redis, request.request_id)
        assert isinstance(records[0], Failure)
        assert (records[0].error.code, records[0].error.param) == ("invalid_reply_to", "reply_to")
        await asyncio.sleep(0.5)
        assert await site.empty()


async def test_the_producer_user_cannot_write_to_the_gateways_exchange(
    deployment: Deployment,
) -> None:
    connection = await aio_pika.connect_robust(deployment.producer_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.REQUESTS_EXCHANGE, ensure=False)
        with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
            await exchange.publish(
                aio_pika.Message(b"x"), routing_key=names.REQUEST_ROUTING_KEY, timeout=5
            )
    finally:
        await connection.close()


async def test_a_forged_request_on_the_gateways_exchange_is_refused_and_billed_to_nobody(
    deployment: Deployment, forger: str
) -> None:
    """A producer user given write access to first.requests by mistake claims another user."""
    d = deployment
    now = time.time()
    forged = RunInference(
        request_id=new_request_id(),
        user_id="victim",
        username="victim",
        model=d.model,
        endpoint="chat.completions",
        body=json.dumps(chat(d.model)).encode(),
        created_at=now,
        expires_at=now + 60,
    )
    async with amqp(d.rabbit_url) as channel:
        usage = await tap(channel, names.USAGE_EXCHANGE)
        dead = await tap(channel, names.DEAD_EXCHANGE)
        message = aio_pika.Message(encode(forged), user_id=forger, message_id="forged")
        forger_url = _with_user(d.rabbit_url, forger)
        await publish_as(forger_url, names.REQUESTS_EXCHANGE, names.REQUEST_ROUTING_KEY, message)
        copy = await dead.get_raw()
        assert copy.headers[names.REASON_HEADER] == "forged_publisher"
        async with Redis.from_url(d.redis_url) as redis:
            records = await stream_records(redis, forged.request_id)
        assert isinstance(records[0], Failure)
        assert records[0].error.code == "forged_publisher"
        await asyncio.sleep(0.5)
        assert await usage.empty()
        for priority in names.PRIORITIES:
            queue = names.site_queue(d.site_id, priority)
            assert await queue_depth(channel, queue) == 0


def test_the_cli_refuses_a_bad_file_naming_the_line_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "custom_id": "a"}) + "\n")
    done = subprocess.run(
        [sys.executable, "-c", "from services.cli import app; app()", "queue", "publish", str(bad)],
        env={"FIRST_API_KEY": "first-x", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "line 2: duplicate custom_id 'a'" in done.stderr
    assert "nothing was published" in done.stderr


@pytest.mark.parametrize("via", ["redis", "reply-queue"])
async def test_the_cli_publishes_a_file_and_writes_openai_batch_output_lines(
    deployment: Deployment, tmp_path: Path, via: str
) -> None:
    d = deployment
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions"}
        | {"body": chat(d.model)}
        for i in range(6)
    ]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [sys.executable, "-c", "from services.cli import app; app()", "queue", "publish"]
    argv += [str(source), "--out", str(out), "--rabbit-url", d.producer_url]
    argv += ["--timeout-s", "20"]
    argv += ["--redis-url", d.redis_url] if via == "redis" else ["--reply-queue", unique("cli")]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={"FIRST_API_KEY": d.key, "PATH": "/usr/bin:/bin"},
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [f"q{i}" for i in range(6)]
    for result in results:
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        assert result["response"]["request_id"] == result["id"]
        assert result["response"]["body"]["object"] == "chat.completion"
    assert "6 completed, 0 failed" in stderr.decode()
