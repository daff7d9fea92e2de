"""A request id is single-use and owned: attacks by a direct producer holding only its own
RabbitMQ user and API key, who knows (or guesses the shape of) ids others were given.

Each is refused `duplicate_request_id` / `invalid_request_id` on the producer's reply queue and
changes nothing: the id's stream keeps exactly the records it had, nothing reaches a site,
no usage is published.
"""

from __future__ import annotations

import json
import time
import uuid

import aio_pika
import pytest
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import RunInference
from schemas.records import Final
from services.access import apikeys
from services.common.db import make_engine
from services.common.ids import new_request_id
from services.producer.client import Producer, Result
from tests.producer.conftest import Deployment, chat, publish_as
from tests.site_agent.helpers import amqp, stream_records, tap, unique, wait_for


def stale_id(age_s: float) -> str:
    """Return a well-formed UUIDv7 made `age_s` seconds ago."""
    fresh = new_request_id()
    ms = int((time.time() - age_s) * 1000)
    return f"{ms:012x}{fresh[12:]}"


async def ended(redis: Redis, request_id: str) -> bool:
    records = await stream_records(redis, request_id)
    return bool(records) and isinstance(records[-1], Final)


async def refused(d: Deployment, request_id: str, body: dict[str, object], key: str) -> Result:
    """Submit `body` under `request_id` with a reply queue; return the answer there."""
    async with Producer(d.producer_url, None, key, reply_queue=unique("replies")) as producer:
        await producer.submit("chat.completions", body, request_id=request_id)
        return await producer.result(request_id, timeout_s=15)


async def test_resubmitting_an_id_already_served_is_refused_and_its_stream_left_alone(
    deployment: Deployment,
) -> None:
    d = deployment
    async with Producer(d.producer_url, d.redis_url, d.key) as producer:
        used = await producer.submit("chat.completions", chat(d.model))
        first = await producer.result(used, timeout_s=20)
    assert first.outcome == "completed"
    async with Redis.from_url(d.redis_url) as redis, amqp(d.rabbit_url) as channel:
        before = await stream_records(redis, used)
        site = await tap(channel, names.SITES_EXCHANGE)
        usage = await tap(channel, names.USAGE_EXCHANGE)
        answer = await refused(d, used, chat(d.model, "something else"), d.key)
        assert answer.error is not None
        assert (answer.status, answer.error.code) == (409, "duplicate_request_id")
        assert await stream_records(redis, used) == before
        assert await site.empty()
        assert await usage.empty()


async def test_another_users_id_is_refused_and_their_stream_left_alone(
    deployment: Deployment, sqlite_url: str
) -> None:
    """An id seen in someone else's logs or `x-request-id`: a second user cannot take it."""
    d = deployment
    engine = make_engine(sqlite_url)
    try:
        mallory_key, _ = await apikeys.create_key(engine, "mallory")
    finally:
        await engine.dispose()
    async with Producer(d.producer_url, d.redis_url, d.key) as producer:
        victims = await producer.submit("chat.completions", chat(d.model))
        assert (await producer.result(victims, timeout_s=20)).outcome == "completed"
    async with Redis.from_url(d.redis_url) as redis, amqp(d.rabbit_url) as channel:
        before = await stream_records(redis, victims)
        site = await tap(channel, names.SITES_EXCHANGE)
        answer = await refused(d, victims, chat(d.model), mallory_key)
        assert answer.error is not None
        assert answer.error.code == "duplicate_request_id"
        assert await stream_records(redis, victims) == before
        assert await site.empty()


async def test_an_id_the_gateway_issued_cannot_be_resubmitted_by_a_producer(
    deployment: Deployment,
) -> None:
    """The gateway's requests reach the router through first.requests; their ids are reserved
    there too, so an `x-request-id` a user saw is no capability at the ingress door."""
    d = deployment
    now = time.time()
    issued = RunInference(
        request_id=new_request_id(),
        user_id="alice",
        username="alice",
        model=d.model,
        endpoint="chat.completions",
        body=json.dumps(chat(d.model)).encode(),
        created_at=now,
        expires_at=now + 60,
    )
    async with Redis.from_url(d.redis_url) as redis, amqp(d.rabbit_url) as channel:
        message = aio_pika.Message(encode(issued), user_id="guest")  # the router's own user
        await publish_as(d.rabbit_url, names.REQUESTS_EXCHANGE, names.REQUEST_ROUTING_KEY, message)
        await wait_for(lambda: ended(redis, issued.request_id), within_s=20)
        records = await stream_records(redis, issued.request_id)
        site = await tap(channel, names.SITES_EXCHANGE)
        answer = await refused(d, issued.request_id, chat(d.model), d.key)
        assert answer.error is not None
        assert answer.error.code == "duplicate_request_id"
        assert await stream_records(redis, issued.request_id) == records
        assert await site.empty()


@pytest.mark.parametrize(
    ("request_id", "why"),
    [
        pytest.param(stale_id(3600), "made an hour ago", id="stale"),
        pytest.param(stale_id(-3600), "made an hour from now", id="future"),
        pytest.param(uuid.uuid4().hex, "a UUIDv4", id="uuid4"),
        pytest.param("my-own-id-0001", "not a UUID", id="free-form"),
    ],
)
async def test_an_id_that_is_not_a_fresh_uuid7_is_refused_without_touching_its_stream(
    deployment: Deployment, request_id: str, why: str
) -> None:
    d = deployment
    async with Redis.from_url(d.redis_url) as redis, amqp(d.rabbit_url) as channel:
        site = await tap(channel, names.SITES_EXCHANGE)
        answer = await refused(d, request_id, chat(d.model), d.key)
        assert answer.error is not None, why
        assert (answer.status, answer.error.code) == (400, "invalid_request_id"), why
        assert await redis.exists(names.stream_key(request_id)) == 0, why
        assert await site.empty(), why
