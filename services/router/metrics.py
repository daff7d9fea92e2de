"""Prometheus series of the router (names documented in the README, section Metrics)."""

from __future__ import annotations

import time
from typing import Final

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from schemas.names import PRIORITIES
from services.common.metrics import ScrapeCollector
from services.router.policy import is_live
from services.router.registry import Registry

ROUTED = Counter(
    "first_router_requests_routed_total",
    "Requests dispatched to a site's queue, by site and priority",
    ["site", "priority"],
)
FAIL_REASONS: Final = ("no_site", "dead_lettered", "undecodable")
FAILED = Counter(
    "first_router_requests_failed_total",
    "Requests the router could not dispatch, by reason (no_site, dead_lettered, undecodable)",
    ["reason"],
)
for _reason in FAIL_REASONS:
    FAILED.labels(_reason)  # export every series from the start, at zero
QUEUE_WAIT = Histogram(
    "first_router_queue_wait_seconds",
    "From the request's creation at the gateway (RunInference.created_at) to its dispatch",
    ["priority"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
for _priority in PRIORITIES:
    QUEUE_WAIT.labels(_priority)
DEAD_LETTERS = Counter(
    "first_router_dead_letters_total",
    "Messages taken from the dead-letter queue, by the queue they died in and RabbitMQ's reason",
    ["queue", "reason"],
)
STARTS = Counter(
    "first_router_model_starts_total",
    "StartModel commands sent to a site (no site had the model hot).",
    ["site"],
)
HEARTBEATS_REFUSED = Counter(
    "first_router_heartbeats_refused_total",
    "Heartbeats ignored: a site id that is not a plain name, or a publisher not the site's user",
    ["reason"],
)
for _refusal in ("site_id", "publisher"):
    HEARTBEATS_REFUSED.labels(_refusal)
MOVED = Counter(
    "first_router_requests_moved_total",
    "Requests moved from a dead site's queues to a live site.",
)


def _site_families(registry: Registry | None) -> list[Metric]:
    age = GaugeMetricFamily(
        "first_router_heartbeat_age_seconds",
        "Seconds since the newest heartbeat of each site the registry holds (live or expiring)",
        labels=["site"],
    )
    live = GaugeMetricFamily(
        "first_router_live_sites", "Sites whose last heartbeat is younger than the site TTL"
    )
    in_flight = GaugeMetricFamily(
        "first_router_in_flight",
        "Requests dispatched to a site that its last heartbeat does not reflect yet",
        labels=["site"],
    )
    if registry is None:
        return [age, live, in_flight]
    now = time.time()
    sites = registry.sites()
    sent = registry.sent()
    for heartbeat in sites:
        age.add_metric([heartbeat.site_id], max(0.0, now - heartbeat.received_at))
        in_flight.add_metric([heartbeat.site_id], sent.get(heartbeat.site_id, 0))
    live.add_metric([], sum(1 for hb in sites if is_live(hb, now, registry.ttl_s)))
    return [age, live, in_flight]


SITES: Final = ScrapeCollector(_site_families)
"""The registry's state at scrape time; the app attaches its Registry while it runs."""
REGISTRY.register(SITES)
