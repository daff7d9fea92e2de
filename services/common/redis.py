"""Redis client factory."""

from __future__ import annotations

from redis.asyncio import Redis


def make_redis(url: str, *, socket_timeout: float = 5.0, max_connections: int = 64) -> Redis:
    """Return a client whose every command is bounded by `socket_timeout`.

    A blocking command (XREAD BLOCK n) needs a client whose timeout exceeds n.
    """
    return Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        max_connections=max_connections,
        health_check_interval=30,
    )
