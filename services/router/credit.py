"""Credit of a site for batch work, pure: the free slots it has beyond the interactive reserve.

    credit = capacity - running - waiting - sent since its last heartbeat - reserve

`sent` counts interactive dispatches too, so batch work backs off as soon as interactive work
takes slots. A batch line goes only to a site with credit > 0: the backlog waits at the router
(unacked in RabbitMQ), not in site queues, so that an interactive request finds a slot, and a
line can still go to whichever site frees a slot first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from schemas.messages import RunInference, SiteHeartbeat
from services.router.policy import free_capacity, is_live, model_status


def reserve(capacity: int, share: float) -> int:
    """Return the slots of a site's `capacity` kept for interactive work: `share` of it,
    rounded up, and at least one slot when the site has two or more (and the share is > 0);
    a one-slot site keeps none, or batch work could never run there."""
    if capacity < 2 or share <= 0:
        return 0
    return min(capacity - 1, max(1, math.ceil(share * capacity - 1e-9)))


def reserve_share(share: float, last_interactive: float, now: float, idle_s: float) -> float:
    """Return the share of slots to keep for interactive work now: `share` while interactive
    requests came within `idle_s`, else 0 — the reserve is lent to batch work while nobody
    waits for an answer, so a batch alone fills every slot. `idle_s` <= 0 never lends it.

    The first interactive request after a quiet spell may wait for a slot (at most one batch
    line's run); from then on batch lines back off until the reserve is free again.
    """
    if idle_s <= 0 or now - last_interactive < idle_s:
        return share
    return 0.0


def credit(heartbeat: SiteHeartbeat, model: str, sent: int, share: float) -> int:
    """Return the batch lines of `model` the site can take now (<= 0: none)."""
    status = model_status(heartbeat, model)
    if status is None or status.state != "hot":
        return 0
    return free_capacity(status, sent) - reserve(status.capacity, share)


def with_credit(
    request: RunInference,
    sites: Sequence[SiteHeartbeat],
    now: float,
    ttl_s: float,
    sent: Mapping[str, int],
    share: float,
) -> list[SiteHeartbeat]:
    """Return the live sites that may take `request` now (its allowed sites, model hot, credit)."""
    return [
        heartbeat
        for heartbeat in sites
        if is_live(heartbeat, now, ttl_s)
        and (not request.allowed_sites or heartbeat.site_id in request.allowed_sites)
        and credit(heartbeat, request.model, sent.get(heartbeat.site_id, 0), share) > 0
    ]
