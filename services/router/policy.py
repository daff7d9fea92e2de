"""Routing decisions as pure functions: no broker, HTTP or Redis here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from schemas.messages import ModelStatus, RunInference, SiteHeartbeat


def is_live(heartbeat: SiteHeartbeat, now: float, ttl_s: float) -> bool:
    """Tell whether a site's last heartbeat is younger than `ttl_s`."""
    return now - heartbeat.sent_at < ttl_s


def hot_status(heartbeat: SiteHeartbeat, model: str) -> ModelStatus | None:
    """Return the site's status of `model` if the site serves it hot, else None."""
    for status in heartbeat.models:
        if status.model == model and status.state == "hot":
            return status
    return None


def free_capacity(status: ModelStatus, in_flight: int = 0) -> int:
    """Return the slots left: capacity minus running, waiting and what was sent but not yet seen.

    May be negative: an overloaded site still ranks, below every less loaded one.
    """
    return status.capacity - status.running - status.waiting - in_flight


def choose_site(
    request: RunInference,
    sites: Sequence[SiteHeartbeat],
    now: float,
    ttl_s: float,
    sent: Mapping[str, int] | None = None,
) -> str | None:
    """Pick the live site serving `request.model` hot with the most free capacity.

    Only the request's `allowed_sites` are candidates when it names any (the catalogue's).

    `sent` counts, per site, what this router dispatched that the site's last heartbeat does
    not reflect yet. Ties go to the smallest site_id, so replicas decide alike. None when no
    live site has the model hot.
    """
    sent = sent or {}
    best: tuple[int, str] | None = None
    for heartbeat in sites:
        if not is_live(heartbeat, now, ttl_s):
            continue
        if request.allowed_sites and heartbeat.site_id not in request.allowed_sites:
            continue
        status = hot_status(heartbeat, request.model)
        if status is None:
            continue
        free = free_capacity(status, sent.get(heartbeat.site_id, 0))
        candidate = (-free, heartbeat.site_id)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[1]
