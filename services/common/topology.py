"""RabbitMQ topology: every exchange and queue declared once, with the same arguments everywhere.

RabbitMQ refuses to redeclare a queue with other arguments, so these objects are the only
place the arguments live; services declare what they publish to and consume from at start.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from faststream.rabbit import ExchangeType, QueueType, RabbitBroker, RabbitExchange, RabbitQueue

from schemas import names

DELIVERY_LIMIT: Final = 5
"""Redeliveries before a quorum queue dead-letters a message (poison or crash loops)."""

_SOURCE_ARGS: Final[dict[str, Any]] = {
    "x-dead-letter-exchange": names.DEAD_EXCHANGE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
    "x-delivery-limit": DELIVERY_LIMIT,
}


def _topic(name: str) -> RabbitExchange:
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)


REQUESTS = _topic(names.REQUESTS_EXCHANGE)
INGRESS = _topic(names.INGRESS_EXCHANGE)
SITES = _topic(names.SITES_EXCHANGE)
CONTROL = _topic(names.CONTROL_EXCHANGE)
USAGE = _topic(names.USAGE_EXCHANGE)
REPLIES = _topic(names.REPLIES_EXCHANGE)
HEARTBEATS = RabbitExchange(names.HEARTBEATS_EXCHANGE, type=ExchangeType.FANOUT, durable=True)
HEARTBEATS_EXISTING = RabbitExchange(
    names.HEARTBEATS_EXCHANGE, type=ExchangeType.FANOUT, durable=True, declare=False
)
"""For binding to: a passive declare needs no configure permission (the router's user has none)."""
USAGE_EXISTING = RabbitExchange(
    names.USAGE_EXCHANGE, type=ExchangeType.TOPIC, durable=True, declare=False
)
"""For binding a router replica's usage queue to (as HEARTBEATS_EXISTING)."""
USAGE_BINDING_KEY: Final = "usage.#"
DEAD = RabbitExchange(names.DEAD_EXCHANGE, type=ExchangeType.FANOUT, durable=True)


def router_usage_queue(instance_id: str) -> RabbitQueue:
    """Return one router replica's own queue on `first.usage` (gone when it disconnects):
    usage is a hint for its fair share, so nothing is kept for a replica that is gone."""
    return RabbitQueue(
        names.router_usage_queue(instance_id),
        durable=False,
        exclusive=True,
        auto_delete=True,
        routing_key=USAGE_BINDING_KEY,
    )


def work_queue(name: str, *, declare: bool = True) -> RabbitQueue:
    """Return a durable quorum queue that dead-letters to `first.dead`."""
    return RabbitQueue(  # type: ignore[call-overload,no-any-return]
        name,
        queue_type=QueueType.QUORUM,
        durable=True,
        declare=declare,
        arguments=dict(_SOURCE_ARGS),
    )


DEAD_QUEUE = RabbitQueue(names.DEAD_QUEUE, queue_type=QueueType.QUORUM, durable=True)
ROUTER_REQUESTS = work_queue(names.ROUTER_REQUESTS_QUEUE)
ROUTER_INGRESS = work_queue(names.ROUTER_INGRESS_QUEUE)
ROUTER_BATCH = work_queue(names.ROUTER_BATCH_QUEUE)
BATCH_RESULTS = work_queue(names.BATCH_RESULTS_QUEUE)
ACCOUNTING_USAGE = work_queue(names.ACCOUNTING_USAGE_QUEUE)

# (exchange, queue, routing key) triples every service may rely on existing.
_CORE_BINDINGS: Final = (
    (DEAD, DEAD_QUEUE, ""),
    # Interactive and batch requests part here (a deployment set up before batches existed
    # has `request.#` on the first queue: rerun `first rabbit setup` and unbind it).
    (REQUESTS, ROUTER_REQUESTS, names.REQUEST_ROUTING_KEY),
    (REQUESTS, ROUTER_BATCH, names.BATCH_REQUEST_ROUTING_KEY),
    (INGRESS, ROUTER_INGRESS, "ingress.#"),
    (USAGE, ACCOUNTING_USAGE, USAGE_BINDING_KEY),
    (REPLIES, BATCH_RESULTS, names.reply_routing_key(names.BATCH_RESULTS_QUEUE)),
)


def site_queues(site_id: str) -> list[tuple[RabbitExchange, RabbitQueue, str]]:
    """Return the bindings of one site's work and control queues."""
    out = [
        (SITES, work_queue(names.site_queue(site_id, p)), names.site_routing_key(site_id, p))
        for p in names.PRIORITIES
    ]
    control = work_queue(names.site_control_queue(site_id))
    out.append((CONTROL, control, names.site_control_routing_key(site_id)))
    return out


async def declare_topology(broker: RabbitBroker, *, site_id: str | None = None) -> None:
    """Declare the core exchanges, queues and bindings (and one site's, if given)."""
    for exchange in (REQUESTS, INGRESS, SITES, CONTROL, USAGE, HEARTBEATS, DEAD, REPLIES):
        await broker.declare_exchange(exchange)
    bindings = list(_CORE_BINDINGS)
    if site_id is not None:
        bindings.extend(site_queues(site_id))
    # Queues are declared on a channel of their own, not through the broker: FastStream caches
    # a declared queue with the channel it was declared on (keyed by name and arguments), and
    # a consumer on a channel of its own (the router's and the agents' batch consumers, with
    # their own prefetch) would otherwise consume on the default channel and its prefetch.
    connection = broker._connection
    if connection is None:
        raise RuntimeError("declare_topology needs a connected broker")
    channel = await connection.channel()
    try:
        for exchange, queue, routing_key in bindings:
            declared = await _declare(channel, queue)
            await declared.bind(exchange.name, routing_key=routing_key)
    finally:
        await channel.close()


async def _declare(channel: Any, queue: RabbitQueue) -> Any:
    return await channel.declare_queue(queue.name, durable=queue.durable, arguments=queue.arguments)


async def prepare(
    broker: RabbitBroker, *, declare: bool, timeout_s: float, site_id: str | None = None
) -> None:
    """Declare the topology at a service's start (bounded), unless an operator has done it.

    With `declare=False` (FIRST_DECLARE_TOPOLOGY=false) nothing is declared: the service's
    least-privilege user could not, and its consumers' passive declares fail fast if the setup
    was skipped.
    """
    if declare:
        await asyncio.wait_for(declare_topology(broker, site_id=site_id), timeout_s)
