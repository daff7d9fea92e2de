"""RabbitMQ's doors, tried with one stolen credential at a time (issue 15, boundary 3).

A private vhost whose users `first rabbit setup` made (sites s1 and s2, producers pa, pb, lab
and lab-x), real RabbitMQ and Redis. Each attack must be refused by RabbitMQ itself
(ACCESS_REFUSED) or by the consumer that checks the publisher (`user_id`, which RabbitMQ
validates), and must change nothing: no message where it should not be, no stream written,
nothing run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import msgspec
import pytest
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import ChannelClosed
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.messages import StartModel, StopModel
from schemas.records import Chunk, Final
from services.access.settings import AccessSettings
from services.common import topology
from services.common.broker import make_broker, publish
from services.producer.client import Producer
from services.router.app import create_app as create_router
from services.router.settings import Settings as RouterSettings
from services.site_agent.settings import Settings as AgentSettings
from tests.common.rabbit_users import Users, attempt, least_privilege_users
from tests.conftest import RABBIT_API, _rabbit_auth
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import (
    amqp,
    make_request,
    queue_depth,
    read_stream,
    running_agent,
    stream_records,
    unique,
    wait_for,
)

SITES = ["s1", "s2"]
PRODUCERS = ("pa", "pb", "lab", "lab-x")
REPLY_NAME = "results"


@pytest.fixture(scope="module")
def deployment(
    new_rabbit_url: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Users]]:
    admin_url = new_rabbit_url()
    workdir = tmp_path_factory.mktemp("rabbit-doors")
    with least_privilege_users(admin_url, SITES, workdir, PRODUCERS) as users:
        yield admin_url, users


def producer_user(users: Users, name: str) -> str:
    return f"{users.prefix}producer-{name}"


def reply_queue(users: Users, name: str) -> str:
    return names.reply_queue_prefix(producer_user(users, name)) + REPLY_NAME


async def open_reply_queue(users: Users, name: str) -> None:
    """Let producer `name` declare and bind its reply queue, as its own user (durable)."""
    async with Producer(users.urls[f"producer {name}"], None, "unused", reply_queue=REPLY_NAME):
        pass


async def depths(admin_url: str, queues: list[str]) -> dict[str, int]:
    async with amqp(admin_url) as channel:
        return {queue: await queue_depth(channel, queue) for queue in queues}


def forged_work(site_id: str) -> bytes:
    return encode(msgspec.structs.replace(make_request("m"), site_id=site_id))


# The default exchange ----------------------------------------------------------------------


async def test_a_site_cannot_publish_into_any_queue_through_the_default_exchange(
    deployment: tuple[str, Users],
) -> None:
    admin_url, users = deployment
    await open_reply_queue(users, "pb")
    targets = [
        names.site_control_queue("s2"),
        names.site_queue("s2", "interactive"),
        names.site_queue("s2", "batch"),
        reply_queue(users, "pb"),
        names.BATCH_RESULTS_QUEUE,
        names.DEAD_QUEUE,
    ]
    before = await depths(admin_url, targets)
    body = encode(StopModel(site_id="s2", model="m", requested_at=time.time()))
    for target in targets:

        async def into(channel: AbstractChannel, target: str = target) -> None:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=target, timeout=5)

        with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
            await attempt(users.urls["site s1"], into)
    assert await depths(admin_url, targets) == before


@pytest.mark.parametrize(
    ("exchange", "routing_key", "body"),
    [
        (names.SITES_EXCHANGE, names.site_routing_key("s2", "interactive"), forged_work("s2")),
        (
            names.CONTROL_EXCHANGE,
            names.site_control_routing_key("s2"),
            encode(StartModel(site_id="s2", model="m", requested_at=0.0)),
        ),
        (
            names.CONTROL_EXCHANGE,
            names.site_control_routing_key("s2"),
            encode(StopModel(site_id="s2", model="m", requested_at=0.0)),
        ),
    ],
    ids=["run-inference", "start-model", "stop-model"],
)
async def test_a_site_cannot_order_another_site_about(
    deployment: tuple[str, Users], exchange: str, routing_key: str, body: bytes
) -> None:
    admin_url, users = deployment
    targets = [names.site_queue("s2", "interactive"), names.site_control_queue("s2")]
    before = await depths(admin_url, targets)

    async def order(channel: AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body), routing_key=routing_key, timeout=5)

    with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
        await attempt(users.urls["site s1"], order)
    assert await depths(admin_url, targets) == before


# Reply keys --------------------------------------------------------------------------------


def bindings(admin_url: str, queue: str) -> set[tuple[str, str]]:
    """Return (exchange, routing key) of every binding of `queue` (management API)."""
    vhost = urllib.parse.unquote(urllib.parse.urlsplit(admin_url).path.lstrip("/"))
    path = f"/queues/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
        listed = api.get(f"{path}/bindings").raise_for_status().json()
    return {(b["source"], b["routing_key"]) for b in listed}


@pytest.mark.parametrize(
    "key_of",
    [
        lambda users: reply_queue(users, "pb"),
        lambda users: names.reply_queue_prefix(producer_user(users, "pb")) + "#",
        lambda users: "#",
        lambda users: names.BATCH_RESULTS_QUEUE,
    ],
    ids=["producer-b's-key", "producer-b's-prefix", "everything", "batch-results"],
)
async def test_a_producer_cannot_bind_its_queue_to_anothers_replies(
    deployment: tuple[str, Users], key_of: Callable[[Users], str]
) -> None:
    admin_url, users = deployment
    await open_reply_queue(users, "pa")
    await open_reply_queue(users, "pb")
    own = reply_queue(users, "pa")
    before = bindings(admin_url, own)

    async def bind(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(own, ensure=False)
        await queue.bind(names.REPLIES_EXCHANGE, routing_key=key_of(users), timeout=5)

    with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
        await attempt(users.urls["producer pa"], bind)
    assert bindings(admin_url, own) == before
    assert (names.REPLIES_EXCHANGE, own) in before  # the producer bound its own key itself


async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


async def test_producer_lab_cannot_read_or_bind_the_queues_of_producer_lab_x(
    deployment: tuple[str, Users],
) -> None:
    _admin_url, users = deployment
    await open_reply_queue(users, "lab-x")
    theirs = reply_queue(users, "lab-x")

    async def consume(channel: AbstractChannel) -> None:
        queue = await channel.get_queue(theirs, ensure=False)
        await queue.consume(ignore, timeout=5)

    async def bind_their_key(channel: AbstractChannel) -> None:
        mine = await channel.declare_queue(reply_queue(users, "lab"), durable=True, timeout=5)
        await mine.bind(names.REPLIES_EXCHANGE, routing_key=theirs, timeout=5)

    for operation in (consume, bind_their_key):
        with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
            await attempt(users.urls["producer lab"], operation)


@pytest.mark.parametrize(
    "argv", [["--producer", "lab.x"], ["--site", "a.b"]], ids=["producer", "site"]
)
def test_the_setup_refuses_a_name_with_a_dot_and_makes_nobody(
    deployment: tuple[str, Users], argv: list[str]
) -> None:
    admin_url, _users = deployment
    prefix = f"t{unique('dot')[-6:]}-"
    command = [sys.executable, "-c", "from services.cli import app; app()", "rabbit", "setup"]
    command += ["--admin-url", admin_url, "--prefix", prefix, "--api-url", RABBIT_API, *argv]
    with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
            made = [u["name"] for u in api.get("/users").json() if u["name"].startswith(prefix)]
        finally:  # a setup that went ahead (today's main) must not leave its users behind
            for user in api.get("/users").json():
                if user["name"].startswith(prefix):
                    api.delete(f"/users/{urllib.parse.quote(user['name'], safe='')}")
    assert done.returncode != 0
    assert "no '.'" in done.stderr
    assert made == []


# Who may give a site work and orders --------------------------------------------------------


def counter(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def dead_letters(queue: str) -> float:
    return counter("first_router_dead_letters_total", {"queue": queue, "reason": "rejected"})


def env_settings(env: dict[str, str], prefix: str) -> dict[str, Any]:
    """Turn `first rabbit setup`'s env lines into settings fields (FIRST_<SERVICE>_X -> x)."""
    fields: dict[str, Any] = {"rabbit_url": env["FIRST_RABBIT_URL"], "declare_topology": False}
    for name, value in env.items():
        if name.startswith(prefix):
            parsed = json.loads(value) if value.startswith("[") else value
            fields[name.removeprefix(prefix).lower()] = parsed
    return fields


@asynccontextmanager
async def stack(users: Users, redis_url: str, backend: FakeBackend) -> AsyncIterator[None]:
    """The router and site s1's agent, each on its own least-privilege user."""
    router_fields = env_settings(users.service_env["router"], "FIRST_ROUTER_")
    router_settings = RouterSettings(
        redis_url=redis_url, no_site_wait_s=10.0, sweep_interval_s=0.5, **router_fields
    )
    agent_fields = env_settings(users.service_env["site_agent"], "FIRST_SITE_AGENT_")
    agent_fields |= {"site_id": "s1", "rabbit_url": users.urls["site s1"]}  # env: the last site's
    agent = AgentSettings(
        redis_url=redis_url,
        backends={backend.model: [backend.url]},
        heartbeat_interval_s=0.3,
        retry_delay_s=0.1,
        **agent_fields,
    )
    router = create_router(router_settings, AccessSettings())
    async with router.router.lifespan_context(router), running_agent(agent):
        registry = router.state.deps.registry
        await wait_for(lambda: registry.get("s1"))  # its heartbeat, from its own user, counts
        yield


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(unique("fake-model")).start()
    yield server
    server.stop()


async def test_a_site_takes_work_and_orders_only_from_a_router(
    deployment: tuple[str, Users], redis_url: str, redis_client: Redis, backend: FakeBackend
) -> None:
    admin_url, users = deployment
    work, control = names.site_queue("s1", "interactive"), names.site_control_queue("s1")
    # The attacker: a user that is not a router but can reach the site's queues (here the
    # administrator, the only other user that may write first.sites and first.control).
    forger = make_broker(admin_url)
    gateway = make_broker(users.urls["gateway"])
    await forger.connect()
    await gateway.connect()
    try:
        async with stack(users, redis_url, backend):
            forged = msgspec.structs.replace(make_request(backend.model), site_id="s1")
            hits, seen = sum(backend.hits.values()), (dead_letters(work), dead_letters(control))
            await publish(
                forger,
                forged,
                exchange=topology.SITES,
                routing_key=names.site_routing_key("s1", "interactive"),
                timeout=5,
            )
            order = StopModel(site_id="s1", model=backend.model, requested_at=time.time())
            await publish(
                forger,
                order,
                exchange=topology.CONTROL,
                routing_key=names.site_control_routing_key("s1"),
                timeout=5,
            )
            # Both are dead-lettered by the agent and logged by the router's dead consumer.
            await wait_for(
                lambda: dead_letters(work) > seen[0] or sum(backend.hits.values()) > hits
            )
            assert sum(backend.hits.values()) == hits  # never run
            await wait_for(lambda: dead_letters(control) > seen[1])  # not taken either
            assert await stream_records(redis_client, forged.request_id) == []  # nor written
            labels = {"kind": "work"}
            assert counter("first_site_agent_forged_total", labels) >= 1
            # The same request through the doors: gateway -> router -> site, run.
            honest = make_request(backend.model)
            await publish(
                gateway,
                honest,
                exchange=topology.REQUESTS,
                routing_key=names.REQUEST_ROUTING_KEY,
                timeout=5,
            )
            records = await read_stream(redis_client, honest.request_id)
            final = records[-1]
            assert isinstance(final, Final)
            assert final.outcome == "completed"
    finally:
        await forger.stop()
        await gateway.stop()


async def test_a_request_body_a_producer_dead_letters_ends_nobodys_stream(
    deployment: tuple[str, Users], redis_url: str, redis_client: Redis, backend: FakeBackend
) -> None:
    _admin_url, users = deployment
    victim = make_request(backend.model)
    key = names.stream_key(victim.request_id)
    await redis_client.xadd(key, {names.RECORD_FIELD: encode(Chunk(data=b"data: {}\n\n"))})
    before = await stream_records(redis_client, victim.request_id)
    seen = dead_letters(names.ROUTER_INGRESS_QUEUE)
    async with stack(users, redis_url, backend):
        # A RunInference (not an IngressRequest) for the victim's id: the router rejects it as
        # undecodable to first.dead, where a RunInference used to end its request's stream.
        body = encode(msgspec.structs.replace(victim, reply_to=""))

        async def send(channel: AbstractChannel) -> None:
            ingress = await channel.get_exchange(names.INGRESS_EXCHANGE, ensure=False)
            message = aio_pika.Message(body, user_id=producer_user(users, "pa"))
            await ingress.publish(message, routing_key=names.INGRESS_ROUTING_KEY, timeout=5)

        await attempt(users.urls["producer pa"], send)
        await wait_for(lambda: dead_letters(names.ROUTER_INGRESS_QUEUE) > seen)
    assert await stream_records(redis_client, victim.request_id) == before
