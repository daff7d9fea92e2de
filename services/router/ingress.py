"""Admission of messages the router did not get from a gateway.

Two doors lead to the router:

- `first.requests`, written by gateways only. RabbitMQ checks each message's `user_id`
  property against the publishing connection's user, so the router serves only messages
  whose `user_id` is one of its `request_publishers` (by default its own RabbitMQ user, which
  single-user deployments share). Anything else — a producer that was given write access there
  by mistake, or a message claiming to be someone else's — is refused.
- `first.ingress`, written by pipelines: an `IngressRequest` with its credential in a header.
  The router admits it exactly as the gateway would (services/access: API keys, Globus
  tokens, the catalogue and its access policy, the quotas, under the same AccessSettings),
  strips the credential, and only then routes it like any request.

A refused message is never served and never billed: its request stream (only if nobody has
written it yet — a forger must not be able to end another user's request) gets the error in
OpenAI's shape, a copy without the credential goes to `first.dead` with the reason in a
header, and the original is acked.
"""

from __future__ import annotations

import logging
import time

from aiormq.abc import FieldValue
from faststream.rabbit.message import RabbitMessage
from redis.asyncio import Redis

from schemas import names
from schemas.codec import encode
from schemas.records import ErrorInfo, Failure, Final, Usage

logger = logging.getLogger(__name__)

# End a stream with an error only if it has no record yet: atomic, one round trip.
END_IF_NEW_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


def credential_of(msg: RabbitMessage) -> str | None:
    """Return the credential header of an ingress message, if any."""
    value = msg.headers.get(names.CREDENTIAL_HEADER)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def reply_to_error(reply_to: str, publisher: str | None) -> ErrorInfo | None:
    """Refuse a reply queue that is not the publisher's own (RabbitMQ vouches for `publisher`)."""
    if not reply_to:
        return None
    if publisher and reply_to.startswith(names.reply_queue_prefix(publisher)):
        return None
    return ErrorInfo(
        status=403,
        message=f"reply_to must name a queue of your own: "
        f"{names.reply_queue_prefix(publisher or '<your RabbitMQ user>')}<name>, and messages "
        "must carry your RabbitMQ user in their user_id property.",
        type="invalid_request_error",
        code="invalid_reply_to",
        param="reply_to",
    )


def publisher_error(user_id: str | None) -> ErrorInfo:
    """The refusal of a `first.requests` message from a user that is not a gateway."""
    return ErrorInfo(
        status=403,
        message=f"Messages on {names.REQUESTS_EXCHANGE} are accepted from gateways only "
        f"(publisher: {user_id or 'unknown'}); pipelines publish to {names.INGRESS_EXCHANGE}.",
        type="invalid_request_error",
        code="forged_publisher",
    )


async def end_if_new(redis: Redis, request_id: str, error: ErrorInfo, stream_ttl_s: float) -> bool:
    """End the request's stream with `error` unless it has a record already; say if it did."""
    final = Final(outcome="failed", usage=Usage(), site_id="", finished_at=time.time())
    ended = await redis.eval(
        END_IF_NEW_SCRIPT,
        1,
        names.stream_key(request_id),
        names.RECORD_FIELD,
        encode(Failure(error=error)),
        encode(final),
        max(1, int(stream_ttl_s)),
    )
    return bool(ended)


def dead_letter_headers(msg: RabbitMessage, error: ErrorInfo) -> dict[str, FieldValue]:
    """The headers of the dead-lettered copy: the reason, never the credential."""
    headers: dict[str, FieldValue] = {
        str(k): str(v)
        for k, v in msg.headers.items()
        if k != names.CREDENTIAL_HEADER and isinstance(v, str | int | float)
    }
    headers[names.REASON_HEADER] = error.code or error.type
    return headers
