"""Every exchange, queue, routing key and Redis key of FIRST — and nowhere else.

The topology (see DESIGN.md):

    first.requests  (topic)  -> first.router.requests        gateway -> router (interactive)
                             -> first.router.batch           batch worker -> router (batch lines)
    first.ingress   (topic)  -> first.router.ingress         producers -> router
    first.sites     (topic)  -> first.site.<site>.<priority> router -> site agent
    first.control   (topic)  -> first.site.<site>.control    router -> site agent
    first.heartbeats (fanout)-> one exclusive queue per router replica
    first.usage     (topic)  -> first.accounting.usage       site agents -> accounting
    first.dead      (fanout) -> first.dead                   RabbitMQ (dead letters)
    first.replies   (topic)  -> first.batch.results          site agents, router -> batch worker
                             -> first.reply.<user>.<name>    site agents, router -> producer
                                (each reply queue bound by its own name: `reply_routing_key`)

Nobody but the topology administrator writes the default exchange: with it, a component could
put a message into any queue by name.
"""

from __future__ import annotations

import re
import time
from typing import Final, Literal

Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")

# Exchanges
REQUESTS_EXCHANGE: Final = "first.requests"
INGRESS_EXCHANGE: Final = "first.ingress"
SITES_EXCHANGE: Final = "first.sites"
CONTROL_EXCHANGE: Final = "first.control"
HEARTBEATS_EXCHANGE: Final = "first.heartbeats"
USAGE_EXCHANGE: Final = "first.usage"
DEAD_EXCHANGE: Final = "first.dead"
REPLIES_EXCHANGE: Final = "first.replies"
"""Where every `Reply` goes (routing key: the reply queue's name). A topic exchange, so that
RabbitMQ's topic permissions can confine each producer to binding keys under its own prefix."""

# Queues
ROUTER_REQUESTS_QUEUE: Final = "first.router.requests"
ROUTER_INGRESS_QUEUE: Final = "first.router.ingress"
ROUTER_BATCH_QUEUE: Final = "first.router.batch"
"""Batch lines on their way to the router: a queue of their own, so that a 50,000-line batch
never stands in front of an interactive request in `first.router.requests`."""
BATCH_RESULTS_QUEUE: Final = "first.batch.results"
"""Where site agents (and the router, for refusals) send the `Reply` of every batch line (the
lines' `reply_to`), through `REPLIES_EXCHANGE`; the batch worker consumes it."""
ACCOUNTING_USAGE_QUEUE: Final = "first.accounting.usage"
DEAD_QUEUE: Final = "first.dead"

# Routing keys
REQUEST_ROUTING_KEY: Final = "request.new"
"""What the gateway publishes an interactive RunInference to `first.requests` with."""
BATCH_REQUEST_ROUTING_KEY: Final = "request.batch"
"""What the batch worker publishes a batch line's RunInference to `first.requests` with."""


def request_routing_key(priority: str) -> str:
    """Return the routing key on first.requests of a request at `priority`."""
    return BATCH_REQUEST_ROUTING_KEY if priority == "batch" else REQUEST_ROUTING_KEY


INGRESS_ROUTING_KEY: Final = "ingress.request"
"""What a direct producer publishes an `IngressRequest` to `first.ingress` with."""
USAGE_ROUTING_KEY: Final = "usage.recorded"

# AMQP headers
CREDENTIAL_HEADER: Final = "x-first-credential"
"""An ingress message's credential (an API key or a Globus access token); stripped on admission."""
REASON_HEADER: Final = "x-first-reason"
"""Why the router refused a message (an OpenAI error code), on the copy it dead-letters."""


SITE_QUEUE_PREFIX: Final = "first.site."


def site_queue(site_id: str, priority: Priority) -> str:
    """Return the queue a site agent consumes for one priority."""
    return f"{SITE_QUEUE_PREFIX}{site_id}.{priority}"


def site_routing_key(site_id: str, priority: Priority) -> str:
    """Return the routing key that reaches `site_queue(site_id, priority)`."""
    return f"site.{site_id}.{priority}"


def site_control_queue(site_id: str) -> str:
    """Return the queue of control commands (StartModel, StopModel) for one site."""
    return f"first.site.{site_id}.control"


def site_control_routing_key(site_id: str) -> str:
    """Return the routing key that reaches `site_control_queue(site_id)`."""
    return f"control.{site_id}"


NAME_PATTERN: Final = r"[A-Za-z0-9_-]+"
"""What a site id, a producer name and a RabbitMQ user that names queues may be made of: no
`.`, which separates the words of queue names and routing keys (with one, user `lab`'s reply
prefix `first.reply.lab.` would also cover user `lab.x`'s queues), and no topic wildcard."""


def is_plain_name(name: str) -> bool:
    """Tell whether `name` matches NAME_PATTERN (whole)."""
    return re.fullmatch(NAME_PATTERN, name) is not None


def reply_queue_prefix(amqp_user: str) -> str:
    """Return the prefix of the reply queues a producer's RabbitMQ user may name and read."""
    return f"first.reply.{amqp_user}."


def reply_routing_key(reply_queue: str) -> str:
    """Return the routing key on `REPLIES_EXCHANGE` that reaches `reply_queue` (its name)."""
    return reply_queue


def heartbeat_queue(router_instance: str) -> str:
    """Return the exclusive heartbeat queue of one router replica."""
    return f"first.router.heartbeats.{router_instance}"


def router_usage_queue(router_instance: str) -> str:
    """Return the exclusive queue of one router replica on `first.usage` (bound `usage.#`): the
    usage that corrects its fair share's estimates. Its own, not a shared one: every replica
    must see the usage of the lines it dispatched."""
    return f"first.router.usage.{router_instance}"


# Redis keys
def stream_key(request_id: str) -> str:
    """Return the Redis stream that carries one request's records to its reader."""
    return f"first:stream:{request_id}"


def request_id_key(request_id: str) -> str:
    """Return the key that reserves a request id for its owner (services/access/request_ids.py)."""
    return f"first:reqid:{request_id}"


def cancel_key(request_id: str) -> str:
    """Return the key the gateway sets when a request's client went away."""
    return f"first:cancel:{request_id}"


CANCEL_CHANNEL: Final = "first:cancel"


def claim_key(request_id: str) -> str:
    """Return the key a site agent takes (SET NX) before it generates a request."""
    return f"first:claim:{request_id}"


REGISTRY_KEY: Final = "first:registry"
"""Hash site_id -> msgpack SiteHeartbeat, mirrored by the router for gateways to read."""


def supervisor_key(part: Literal["lock", "leases"]) -> str:
    """Return a key of `first sites supervise`: its lock, or its hash of leases.

    The lock (SET NX PX, token value) keeps one supervisor active; the leases hash (site_id ->
    start time of the site's newest lease) lets a standby that takes over adopt running leases.
    """
    return f"first:supervisor:{part}"


def wake_key(reader_id: str) -> str:
    """Return the stream that wakes a gateway's multiplexed reader when a request joins."""
    return f"first:wake:{reader_id}"


def apikey_cache_key(key_hash: str) -> str:
    """Return the Redis cache entry of one API key (by its hash, never the key)."""
    return f"first:apikey:{key_hash}"


def globus_cache_key(token_hash: str) -> str:
    """Return the Redis cache entry of one Globus token's verdict (by its hash, never the token)."""
    return f"first:globus:{token_hash}"


QuotaCounter = Literal["requests", "tokens"]
QuotaScope = Literal["user", "group"]
QuotaPeriod = Literal["minute", "day", "month"]
QUOTA_TTL_S: Final[dict[QuotaPeriod, int]] = {"minute": 120, "day": 2 * 86400, "month": 32 * 86400}
"""How long a quota counter outlives its window (then Redis drops it)."""


def quota_window(period: QuotaPeriod, at: float) -> str:
    """Return the id of the fixed window (UTC) that `at` falls in."""
    if period == "minute":
        return f"m{int(at // 60)}"
    return time.strftime("d%Y%m%d" if period == "day" else "M%Y%m", time.gmtime(at))


def quota_key(
    counter: QuotaCounter, scope: QuotaScope, subject: str, period: QuotaPeriod, at: float
) -> str:
    """Return the Redis counter of `counter` for one user or group in the window of `at`.

    The gateway reads (and, for requests, increments) these to enforce limits; the accounting
    service adds each request's billed tokens once, when its ledger row is written.
    """
    return f"first:quota:{counter}:{scope}:{subject}:{quota_window(period, at)}"


def quota_key_glob(counter: QuotaCounter | None = None) -> str:
    """Return the glob of every quota counter (of one `counter` only, if given): what a Redis
    ACL grants (services/common/redis_access.py)."""
    return f"first:quota:{counter}:*" if counter else "first:quota:*"


# Stream record fields
RECORD_FIELD: Final = b"r"
