"""Which heartbeats the router believes, and on whose clock (pure: no broker, no Redis).

Any site's credential can publish to `first.heartbeats`, so a heartbeat counts only when its
publisher — the `user_id` property, which RabbitMQ checks against the publishing connection's
user — is the user of the site it speaks for. And a site's clock is not ours: a heartbeat
dated in the future must not keep a site live for good, so the router stamps when it received
each one (`received_at`) and judges liveness by that alone; `sent_at`, still used to keep the
newer of two heartbeats, is clamped into a window of the router's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

from schemas import names
from schemas.messages import SiteHeartbeat

Refusal = Literal["site_id", "publisher"]
"""Why a heartbeat was refused: a site id that is not a plain name, or a publisher that is not
the site's user."""


def refusal(
    heartbeat: SiteHeartbeat,
    publisher: str | None,
    site_users: Callable[[str], frozenset[str]],
) -> Refusal | None:
    """Return why `heartbeat` must be ignored, None if its publisher may speak for its site.

    `site_users(site_id)` names the RabbitMQ users allowed to publish that site's heartbeats.
    """
    if not names.is_plain_name(heartbeat.site_id):
        return "site_id"
    if publisher is None or publisher not in site_users(heartbeat.site_id):
        return "publisher"
    return None


def stamp(heartbeat: SiteHeartbeat, now: float, skew_s: float) -> SiteHeartbeat:
    """Return `heartbeat` received at `now`: `received_at` set, `sent_at` within now ± skew."""
    sent_at = min(max(heartbeat.sent_at, now - skew_s), now + skew_s)
    return msgspec.structs.replace(heartbeat, sent_at=sent_at, received_at=now)
