"""Site agent settings (env prefix FIRST_SITE_AGENT_; shared ones FIRST_)."""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings


class Settings(CommonSettings):
    """What one site's agent needs; every network call and wait has a bound here."""

    model_config = SettingsConfigDict(env_prefix="FIRST_SITE_AGENT_", extra="ignore")

    site_id: str = "local"
    agent_id: str = Field(default_factory=lambda: secrets.token_hex(4))
    host: str = "127.0.0.1"
    port: int = 8020
    backends: dict[str, list[str]] = Field(default_factory=dict)
    """Served model name -> base URLs of its vLLM instances (env: JSON)."""
    backend_key_files: dict[str, Path] = Field(default_factory=dict)
    """Served model name -> a file (0600) with the key its `backends` want as
    `Authorization: Bearer` (env: JSON); a model not named here is sent no key."""
    config_file: Path | None = None
    """The site file (TOML/YAML, services/site_agent/siteconfig.py): its site_id, models and
    launcher; models it lists are started and stopped by the agent. Env `backends` still add
    instances by URL."""
    cold_start_timeout_s: float = 900.0
    """Longest a request waits at the agent for a cold model to become hot (503 model_starting)."""
    lifecycle_interval_s: float = 1.0
    """How often the instance manager looks at every model's instances."""
    max_concurrency_per_instance: int = 8
    """Requests one instance takes at once; the heartbeat's capacity is this x healthy ones."""
    heartbeat_interval_s: float = 2.0
    prefetch: int = 32
    """Unacked interactive requests held at once."""
    batch_prefetch: int = 16
    """Unacked batch requests held at once: at least the site's slots (heartbeat capacity),
    or batch work cannot fill them. The router's credit, not this bound, keeps batch work
    within the slots that are free (services/router/credit.py)."""
    stream_ttl_s: float = 3600.0
    """Expiry of a request's stream, renewed on each record."""
    claim_ttl_s: float = 15.0
    """Expiry of a request's claim, renewed every third of it while the request runs; a dead
    agent's requests are taken over by its successor after at most this long."""
    claim_poll_s: float = 0.5
    """How often a delivery whose claim another agent of this site holds looks again."""
    backend_connect_timeout_s: float = 5.0
    backend_read_timeout_s: float = 60.0
    """Longest gap between two chunks of a streamed response."""
    backend_response_timeout_s: float = 600.0
    """Longest wait for a whole non-streamed response."""
    probe_timeout_s: float = 2.0
    """Bound on one /health or /metrics probe."""
    cancel_poll_s: float = 1.0
    """How often running requests' cancel keys are checked besides the pub/sub channel."""
    retry_delay_s: float = 1.0
    """Pause before requeueing a request after a Redis or broker failure."""
    router_users: list[str] = Field(default_factory=list)
    """RabbitMQ users (routers) whose work and control messages this agent takes, checked
    through the `user_id` property that RabbitMQ validates; anything else is dead-lettered,
    never run. Empty: the agent's own user (a deployment where every service shares one)."""

    def trusted_routers(self) -> frozenset[str]:
        """Return the users whose work and control messages are taken."""
        return self.or_own_user(self.router_users)
