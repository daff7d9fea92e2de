"""Router settings (env prefix FIRST_ROUTER_; shared ones FIRST_)."""

from __future__ import annotations

import secrets

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings
from services.router.policy import Policy


class Settings(CommonSettings):
    """What the router needs; every wait has a bound here."""

    model_config = SettingsConfigDict(env_prefix="FIRST_ROUTER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8010
    instance_id: str = Field(default_factory=lambda: secrets.token_hex(4))
    """Names this replica's exclusive heartbeat queue; unique per running replica."""
    prefetch: int = 64
    """Unacked requests this replica holds at once (its share of the backlog)."""
    batch_prefetch: int = 512
    """Unacked batch lines this replica holds at once, on a channel of their own. They wait
    here, unacked (so a crash loses none), until a site has credit (services/router/credit.py):
    enough to keep every site's free slots filled between two heartbeats."""
    interactive_reserve: float = Field(default=0.25, ge=0.0, lt=1.0)
    """Share of each site's slots that batch lines never take (at least one slot of a site with
    two or more), so that an interactive request finds one free."""
    reserve_idle_s: float = 30.0
    """The reserve is lent to batch work once this replica routed no interactive request for
    this long (0: never lent): a batch alone then uses every slot."""
    prompt_token_weight: float = Field(default=1.0, ge=0.0)
    """Worth of a prompt token against a completion token in the fair share between users."""
    dispatch_tick_s: float = Field(default=0.5, gt=0.0)
    """How often held batch lines are looked at without a heartbeat (expiry, model starts)."""
    no_site_wait_s: float = 10.0
    """How long a request waits for a live site with its model hot before it fails with 503."""
    stream_ttl_s: float = 3600.0
    """Expiry of a stream the router ends itself (no site, dead-lettered)."""
    sweep_interval_s: float = 5.0
    """How often expired sites leave the registry and its Redis mirror."""
    request_publishers: list[str] = Field(default_factory=list)
    """RabbitMQ users (gateways) whose messages on first.requests are served; empty: the
    router's own user (a deployment where every service shares one RabbitMQ user)."""
    site_user_prefix: str = ""
    """A site's heartbeats count only from RabbitMQ user `<this prefix><site id>` (checked
    through the `user_id` property RabbitMQ validates; `first rabbit setup` prints it, e.g.
    `first-site-`). Empty: only the router's own user (every service shares one user)."""
    heartbeat_skew_s: float = Field(default=5.0, ge=0.0)
    """A heartbeat's `sent_at` is clamped to within this of the router's clock (it orders two
    heartbeats of a site; liveness is judged by receive time). Keep it below the site TTL."""
    policy: Policy = "first"
    """How a site is chosen among those with the model hot: "first" (least estimated wait, with
    cache affinity; services/router/policy.py), or the baselines "round_robin" and "random"."""
    policy_seed: int | None = None
    """Seed of the "random" policy's generator, for reproducible benchmarks (None: random)."""
    first_record_timeout_s: float = 300.0
    """Expiry of an admitted direct producer's request: how long it may wait for its first
    stream record (the gateway's own bound, FIRST_GATEWAY_FIRST_RECORD_TIMEOUT_S, for HTTP)."""
    retry_delay_s: float = 1.0
    """Pause before requeueing a message that cannot be decided now (Redis, Globus down)."""

    def trusted_publishers(self) -> frozenset[str]:
        """Return the users whose first.requests messages are served."""
        return self.or_own_user(self.request_publishers)

    def site_users(self, site_id: str) -> frozenset[str]:
        """Return the users whose heartbeats may speak for `site_id`."""
        return self.or_own_user([self.site_user_prefix + site_id] if self.site_user_prefix else [])
