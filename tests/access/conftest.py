"""Access is tested through the gateway's HTTP edge as well as directly: its fixtures are shared."""

from tests.gateway.conftest import (
    api_key_for,
    fake_globus,
    gateway,
    gateway_redis_url,
    gateway_space,
    make_gateway,
)

__all__ = [
    "api_key_for",
    "fake_globus",
    "gateway",
    "gateway_redis_url",
    "gateway_space",
    "make_gateway",
]
