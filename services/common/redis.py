"""Redis client factory."""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

RETRIES = 3


def make_redis(url: str, *, socket_timeout: float = 5.0, max_connections: int = 64) -> Redis:
    """Return a client whose every command is bounded by `socket_timeout`.

    A blocking command (XREAD BLOCK n) needs a client whose timeout exceeds n. When all
    `max_connections` are busy a command waits (up to `socket_timeout`) for one: redis-py's
    default pool raises `Too many connections` at once instead, which under a burst turned
    into spurious 503s at the gateway.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        # PING a connection idle for over a second before using it: after a Redis restart a
        # pooled connection is stale, and redis-py does not retry a pipeline on it.
        health_check_interval=1,
        # ...and retry a command on a connection error (a restart, a dropped socket): redis-py's
        # asyncio client does not by default.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[redis_errors.ConnectionError],
    )
    return Redis.from_pool(pool)
