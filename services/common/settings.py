"""Settings every service shares (env FIRST_<NAME>, whatever the service's own prefix)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import (
    BaseSettings,
    SettingsConfigDict,
)

from services.common.broker import amqp_user


def shared(default: Any, env: str) -> Any:
    """Declare a field read from `FIRST_<env>` in every service, not under its own prefix."""
    return Field(default=default, validation_alias=AliasChoices(f"FIRST_{env}", env.lower()))


class CommonSettings(BaseSettings):
    """Broker, Redis and logging settings; each service's Settings extends this."""

    model_config = SettingsConfigDict(env_prefix="FIRST_", extra="ignore", populate_by_name=True)

    rabbit_url: str = shared("amqp://guest:guest@127.0.0.1:5672/", "RABBIT_URL")
    redis_url: str = shared("redis://127.0.0.1:6379/0", "REDIS_URL")
    log_level: str = shared("INFO", "LOG_LEVEL")
    log_json: bool | None = shared(None, "LOG_JSON")
    """JSON logs; None means JSON when stderr is not a TTY."""
    publish_timeout_s: float = shared(10.0, "PUBLISH_TIMEOUT_S")
    """Bound on one publisher-confirmed publish."""
    declare_topology: bool = shared(True, "DECLARE_TOPOLOGY")
    """Declare the exchanges and queues at start; false when an operator declared them with
    `first rabbit setup` and the service's user may not (services/common/rabbit_access.py)."""
    site_ttl_s: float = shared(15.0, "SITE_TTL_S")
    """A site without a heartbeat for this long is not live."""

    def or_own_user(self, users: Iterable[str]) -> frozenset[str]:
        """Return the RabbitMQ users a service trusts to send it something: `users`, or, when
        none are configured, its own (a deployment where every service shares one user)."""
        return frozenset(users) or frozenset([amqp_user(self.rabbit_url)])
