"""The usage consumer: decode -> ledger (write-combined) -> ack; poison to `first.dead`.

How each delivery of `first.accounting.usage` is settled:

    undecodable bytes or another tag   reject (no requeue) -> first.dead, one WARNING
    new request_id                     row inserted, then ack
    request_id already in the ledger   nothing written, ack (a redelivery or a re-publish;
    or earlier in the same batch       also when both copies arrive together)
    database unavailable               retried per RetryPolicy, then nack (requeue)

Deliveries are handled concurrently (up to the channel's prefetch); each hands its event to
the LedgerBatcher and is acked only once the transaction holding its row has committed.

A requeue counts towards the queue's delivery limit (topology.DELIVERY_LIMIT); past it,
RabbitMQ dead-letters the event to `first.dead`, where it stays until an operator replays
it, so a bill outlives even a long database outage.
"""

from __future__ import annotations

import logging
import time

from faststream import AckPolicy
from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber

from schemas import names
from schemas.codec import usage_decoder
from services.accounting.batcher import LedgerBatcher
from services.accounting.errors import LedgerUnavailable
from services.accounting.metrics import EVENTS, LEDGER_WRITE
from services.common import topology
from services.common.broker import current_message, decode_or_reject, raw_body
from services.common.logging import request_id_var, site_id_var, user_id_var

logger = logging.getLogger(__name__)


def register_usage_subscriber(broker: RabbitBroker, batcher: LedgerBatcher) -> RabbitSubscriber:
    """Consume `first.accounting.usage` into the ledger; the queue must have been declared."""
    queue = topology.work_queue(names.ACCOUNTING_USAGE_QUEUE, declare=False)
    subscriber = broker.subscriber(
        queue, ack_policy=AckPolicy.MANUAL, title="accounting.usage", decoder=raw_body
    )

    @subscriber
    async def on_usage_recorded() -> None:
        """Write one UsageRecorded to the ledger, once per request_id."""
        msg = current_message(broker)
        event = await decode_or_reject(msg, usage_decoder)
        if event is None:
            EVENTS.labels("rejected").inc()
            return
        request_id_var.set(event.request_id)
        user_id_var.set(event.user_id)
        site_id_var.set(event.site_id)
        started = time.monotonic()
        try:
            inserted = await batcher.record(event)
        except LedgerUnavailable as exc:
            LEDGER_WRITE.labels("unavailable").observe(time.monotonic() - started)
            logger.error("ledger unavailable, usage goes back to the queue: %s", exc)
            await msg.nack(requeue=True)
            EVENTS.labels("requeued").inc()
            return
        result = "recorded" if inserted else "duplicate"
        LEDGER_WRITE.labels(result).observe(time.monotonic() - started)
        await msg.ack()
        EVENTS.labels(result).inc()
        logger.info(
            "usage %s: %s, %d prompt + %d completion tokens, %s",
            result,
            event.model,
            event.prompt_tokens,
            event.completion_tokens,
            event.outcome,
        )

    return subscriber
