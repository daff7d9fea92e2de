"""Thin adapters from broker deliveries to the registry and the policy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from faststream.rabbit import RabbitBroker
from faststream.rabbit.message import RabbitMessage
from redis.asyncio import Redis
from redis.exceptions import RedisError

from schemas import names
from schemas.codec import DecodeError, heartbeat_decoder, ingress_decoder, run_inference_decoder
from schemas.messages import RunInference, StartModel
from schemas.records import ErrorInfo
from services.access.admission import Access
from services.access.errors import ApiError, Unavailable
from services.access.request_ids import DuplicateRequestId
from services.common import replies, streams, topology
from services.common.broker import PUBLISH_ERRORS, decode_or_reject, publish
from services.common.logging import request_id_var, site_id_var, user_id_var
from services.router import errors, heartbeats, ingress, metrics
from services.router.policy import PolicyState, StartOn, WaitFor, choose_site, choose_start_site
from services.router.registry import Registry
from services.router.settings import Settings

logger = logging.getLogger(__name__)

ID_REFUSALS: frozenset[str | None] = frozenset({"invalid_request_id", "duplicate_request_id"})
"""Refusals of the id itself: its stream may be someone else's."""

REFUSE_ERRORS: tuple[type[BaseException], ...] = (RedisError, *PUBLISH_ERRORS)


@dataclass(frozen=True)
class Deps:
    """What the handlers use; built once by `create_app`."""

    settings: Settings
    broker: RabbitBroker
    redis: Redis
    registry: Registry
    access: Access
    policy: PolicyState = field(default_factory=PolicyState)
    """This replica's routing memory (affinity, round-robin turns, starts it ordered)."""


def pick_site(deps: Deps, request: RunInference, now: float) -> str | None:
    """Return a site with `request.model` hot, by the configured policy (None if none)."""
    registry = deps.registry
    return choose_site(
        request,
        registry.sites(),
        now,
        registry.ttl_s,
        registry.sent(),
        policy=deps.settings.policy,
        state=deps.policy,
    )


async def wait_for_site(deps: Deps, request: RunInference, deadline: float) -> str | None:
    """Return a site for `request`, waiting for heartbeats until `deadline` (epoch s) at most.

    A site with the model hot is chosen by the policy. If none has it hot, a site that is
    starting it, or the best one that may start it (told so with a StartModel), gets the
    request: it waits there, in that site's queue and agent, until an instance is hot.
    """
    while True:
        now = time.time()
        site_id = pick_site(deps, request, now)
        if site_id is not None:
            return site_id
        decision = choose_start_site(
            request, deps.registry.sites(), now, deps.registry.ttl_s, state=deps.policy
        )
        if isinstance(decision, WaitFor):
            return decision.site_id
        if isinstance(decision, StartOn):
            await start_model(deps, decision.site_id, request.model)
            return decision.site_id
        if now >= deadline:
            return None
        await deps.registry.wait_update(deadline - now)


async def start_model(deps: Deps, site_id: str, model: str) -> None:
    """Ask `site_id` to start `model` (confirmed; a lost order is repeated by the next request)."""
    command = StartModel(site_id=site_id, model=model, requested_at=time.time())
    try:
        await publish(
            deps.broker,
            command,
            exchange=topology.CONTROL,
            routing_key=names.site_control_routing_key(site_id),
            timeout=deps.settings.publish_timeout_s,
        )
    except PUBLISH_ERRORS as exc:  # the request still goes there: its wait starts the model
        logger.warning("StartModel %s on %s not confirmed: %r", model, site_id, exc)
        return
    metrics.STARTS.labels(site_id).inc()
    logger.info("asked site %s to start %s", site_id, model)


Then = Callable[[RabbitMessage, "Deps", RunInference], Awaitable[None]]
"""What becomes of a trusted request: `route` (at once), or the dispatcher's `hold` (batch)."""


async def handle_request(msg: RabbitMessage, deps: Deps, then: Then | None = None) -> None:
    """Take one RunInference from a gateway: `then` it (default: `route` it to a site's queue
    now, or end its stream with a 503)."""
    request = await decode_or_reject(msg, run_inference_decoder)
    if request is None:
        metrics.FAILED.labels("undecodable").inc()
        return
    request_id_var.set(request.request_id)
    publisher = msg.raw_message.user_id
    if publisher not in deps.settings.trusted_publishers():
        await refuse(msg, deps, request.request_id, ingress.publisher_error(publisher))
        return
    user_id_var.set(request.user_id)
    try:
        await deps.access.request_ids.reserve_for(
            request.request_id, request.user_id, request.endpoint, request.body
        )
    except RedisError as exc:
        await requeue_later(msg, deps, "reserve the request id", exc)
        return
    except DuplicateRequestId as exc:
        await refuse(msg, deps, request.request_id, exc.info(), request.reply_to, own=False)
        return
    await (then or route)(msg, deps, request)


async def handle_ingress(msg: RabbitMessage, deps: Deps) -> None:
    """Admit one IngressRequest as the gateway would, then route it; else refuse it."""
    ingress_request = await decode_or_reject(msg, ingress_decoder)
    if ingress_request is None:
        metrics.FAILED.labels("undecodable").inc()
        return
    request_id_var.set(ingress_request.request_id)
    bad_reply_to = ingress.reply_to_error(ingress_request.reply_to, msg.raw_message.user_id)
    if bad_reply_to is not None:
        await refuse(msg, deps, ingress_request.request_id, bad_reply_to)
        return
    try:
        request = await deps.access.admit_ingress(
            ingress_request,
            ingress.credential_of(msg),
            first_record_timeout_s=deps.settings.first_record_timeout_s,
        )
    except (Unavailable, RedisError) as exc:  # cannot decide now (Globus, Redis): later
        await requeue_later(msg, deps, "admit", exc)
        return
    except ApiError as exc:
        # An id refused as an id (malformed, stale, someone else's) may name a stream the
        # publisher does not own: the refusal goes to its reply queue only.
        own = exc.code not in ID_REFUSALS
        await refuse(
            msg, deps, ingress_request.request_id, exc.info(), ingress_request.reply_to, own=own
        )
        return
    user_id_var.set(request.user_id)
    await route(msg, deps, request)


async def requeue_later(msg: RabbitMessage, deps: Deps, what: str, exc: BaseException) -> None:
    """Give `msg` back to its queue after a pause: it cannot be decided now (Redis, Globus or
    the broker away); the queue's delivery limit bounds how often."""
    logger.warning("cannot %s now, requeueing: %r", what, exc)
    await asyncio.sleep(deps.settings.retry_delay_s)
    await msg.nack(requeue=True)


async def refuse(
    msg: RabbitMessage,
    deps: Deps,
    request_id: str,
    error: ErrorInfo,
    reply_to: str = "",
    *,
    own: bool = True,
) -> None:
    """Never serve `msg`: end its (new) stream with `error`, dead-letter a copy, ack it.

    `reply_to` (already checked to be the publisher's own queue) also gets the refusal.
    `own` false: the id may be another's, whose stream is left alone whatever it holds.
    """
    try:
        ended = own and await ingress.end_if_new(
            deps.redis, request_id, error, deps.settings.stream_ttl_s
        )
        await deps.broker.publish(
            msg.body,
            exchange=topology.DEAD,
            routing_key="",
            headers=ingress.dead_letter_headers(msg, error),
            persist=True,
            mandatory=True,
            timeout=deps.settings.publish_timeout_s,
            content_type=msg.content_type,
            message_id=msg.message_id,
            message_type=msg.raw_message.type,
        )
        if reply_to:
            reply = replies.refusal(request_id, error)
            await replies.send_reply(deps.broker, reply_to, reply, deps.settings.publish_timeout_s)
    except REFUSE_ERRORS as exc:
        await requeue_later(msg, deps, "refuse", exc)
        return
    await msg.ack()
    metrics.FAILED.labels("refused").inc()
    logger.warning(
        "refused: %s (stream %s)", error.code, "ended" if ended else "left alone: it has records"
    )


async def dispatch(deps: Deps, request: RunInference, site_id: str) -> None:
    """Publish `request` to `site_id`'s queue of its priority (confirmed) and count it as sent.

    Raises what `publish` raises when the broker did not confirm.
    """
    await publish(
        deps.broker,
        msgspec.structs.replace(request, site_id=site_id),
        exchange=topology.SITES,
        routing_key=names.site_routing_key(site_id, request.priority),
        timeout=deps.settings.publish_timeout_s,
        message_id=request.request_id,
    )
    deps.registry.record_sent(site_id)
    if request.priority == "interactive":
        deps.registry.last_interactive = time.time()


async def route(msg: RabbitMessage, deps: Deps, request: RunInference) -> None:
    """Send an admitted request to a site's queue, or end its stream with a 503; settle `msg`."""
    started = time.time()
    deadline = min(request.expires_at, started + deps.settings.no_site_wait_s)
    site_id = await wait_for_site(deps, request, deadline)
    if site_id is None:
        await _fail_no_site(msg, deps, request, time.time() - started)
        return
    site_id_var.set(site_id)
    try:
        await dispatch(deps, request, site_id)
    except PUBLISH_ERRORS as exc:
        logger.warning("dispatch to %s failed, requeueing: %r", site_id, exc)
        await msg.nack(requeue=True)
        return
    await msg.ack()
    queued_s = max(0.0, time.time() - request.created_at)
    metrics.ROUTED.labels(site_id, request.priority).inc()
    metrics.QUEUE_WAIT.labels(request.priority).observe(queued_s)
    logger.info(
        "routed %s (%s) to site %s after %.3f s", request.model, request.priority, site_id, queued_s
    )


async def _fail_no_site(
    msg: RabbitMessage, deps: Deps, request: RunInference, waited_s: float
) -> None:
    error = errors.no_site_available(request.model, waited_s)
    try:
        await streams.fail(
            deps.redis, request.request_id, error, site_id="", ttl_s=deps.settings.stream_ttl_s
        )
    except RedisError as exc:
        logger.warning("cannot end stream (no site), requeueing: %s", exc)
        await msg.nack(requeue=True)
        return
    if request.reply_to:
        try:
            reply = replies.refusal(request.request_id, error)
            await replies.send_reply(
                deps.broker, request.reply_to, reply, deps.settings.publish_timeout_s
            )
        except PUBLISH_ERRORS as exc:  # the stream has it; the next delivery sends the reply
            logger.warning("cannot send the reply (no site), requeueing: %r", exc)
            await msg.nack(requeue=True)
            return
    logger.info("no live site for model %s after %.1f s", request.model, waited_s)
    await msg.ack()
    metrics.FAILED.labels("no_site").inc()


async def handle_heartbeat(msg: RabbitMessage, deps: Deps) -> None:
    """Record one site heartbeat from that site's own user (the queue is consumed without
    acks); any other is logged, counted and changes nothing."""
    try:
        heartbeat = heartbeat_decoder.decode(msg.body)
    except DecodeError as exc:
        logger.warning("ignoring undecodable heartbeat (%d bytes): %s", len(msg.body), exc)
        return
    publisher = msg.raw_message.user_id
    refused = heartbeats.refusal(heartbeat, publisher, deps.settings.site_users)
    if refused is not None:
        metrics.HEARTBEATS_REFUSED.labels(refused).inc()
        logger.warning(
            "ignoring a heartbeat for site %r from %s (refused: %s)",
            heartbeat.site_id[:64],
            publisher or "an unnamed publisher",
            refused,
        )
        return
    await deps.registry.observe(heartbeat)
