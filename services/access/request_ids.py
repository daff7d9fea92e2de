"""A request id is single-use and owned.

Direct producers choose their request ids (they read results from the id's stream), so an id
is a capability: resubmitting one a user once saw (`x-request-id`) could get a generation the
ledger drops as a duplicate (unbilled), or someone else's result while the old stream lives.
So the router admits an id only when

- it is a UUIDv7 (32 hex digits, as `services.common.ids.new_request_id` makes them) whose
  time is within `skew_s` of now (`check_id`, pure), and
- it reserves it: `SET first:reqid:<id> <owner> NX` kept for twice `skew_s` and a minute, longer
  than the id can pass the time check, so no id is ever admitted twice. The owner is the user
  and a digest of what was asked: a redelivery of the same message (a router that crashed
  before its ack, a batch line republished) is the same owner and passes; anything else under
  that id is refused `duplicate_request_id`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from redis.asyncio import Redis

from schemas import names
from services.access.errors import ApiError, InvalidRequest

_UUID7: Final = re.compile(r"[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}")

# Reserve, or find the same owner's reservation (a redelivery): 1; another owner's: 0.
RESERVE_SCRIPT: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""


class DuplicateRequestId(ApiError):
    """409: the id was already used, by another request or another user."""

    status = 409
    type = "invalid_request_error"


def id_time(request_id: str) -> float | None:
    """Return the time (epoch seconds) a UUIDv7 request id was made at; None if not one."""
    if not _UUID7.fullmatch(request_id):
        return None
    return int(request_id[:12], 16) / 1000.0


def check_id(request_id: str, now: float, skew_s: float) -> None:
    """Raise InvalidRequest unless `request_id` is a UUIDv7 made within `skew_s` of `now`."""
    made = id_time(request_id)
    if made is None:
        raise InvalidRequest(
            "request_id must be a UUIDv7 as 32 lowercase hex digits (the producer API makes "
            "them: services.common.ids.new_request_id).",
            code="invalid_request_id",
            param="request_id",
        )
    if abs(now - made) > skew_s:
        raise InvalidRequest(
            f"request_id was made {now - made:+.0f} s from now; ids are accepted within "
            f"{skew_s:g} s of the router's clock. Make a new id for every request.",
            code="invalid_request_id",
            param="request_id",
        )


def owner_of(user_id: str, endpoint: str, body: bytes) -> str:
    """Return who holds an id: the user and a digest of what they asked for under it."""
    digest = hashlib.sha256(endpoint.encode() + b"\0" + body).hexdigest()[:32]
    return f"{user_id}:{digest}"


class RequestIds:
    """Reservations of request ids in Redis (one round trip each)."""

    def __init__(self, redis: Redis, skew_s: float) -> None:
        self._redis = redis
        self._ttl_s = int(2 * skew_s) + 60

    async def reserve(self, request_id: str, owner: str) -> None:
        """Reserve `request_id` for `owner`; raise DuplicateRequestId if another holds it."""
        held = await self._redis.eval(
            RESERVE_SCRIPT, 1, names.request_id_key(request_id), owner, self._ttl_s
        )
        if not held:
            raise DuplicateRequestId(
                f"Request id {request_id} has already been used. Make a new id for every request.",
                code="duplicate_request_id",
                param="request_id",
            )

    async def reserve_for(self, request_id: str, user_id: str, endpoint: str, body: bytes) -> None:
        """Reserve `request_id` for `user_id` asking `endpoint` with `body` (see `owner_of`)."""
        await self.reserve(request_id, owner_of(user_id, endpoint, body))
