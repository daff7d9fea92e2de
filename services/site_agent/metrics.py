"""Prometheus series of the site agent (names documented in the README, section Metrics).

The handler opens `track(request)` around each delivery; the forwarder reports what it
writes (`written`) and the executor each Final it writes (`finished`). The delivery's
timing travels in a context variable, so the forwarding task (a child of the handler's
task) sees it without being passed anything.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final as Constant

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from schemas.messages import RunInference
from schemas.records import Chunk, Final, Record
from services.common.metrics import ScrapeCollector
from services.site_agent.backends import Backends

REQUESTS = Counter(
    "first_site_agent_requests_total",
    "Requests this agent ended with a Final record, by model and outcome",
    ["model", "outcome"],
)
PROMPT_TOKENS = Counter(
    "first_site_agent_prompt_tokens_total",
    "Prompt tokens billed in the Final records this agent wrote, by model",
    ["model"],
)
COMPLETION_TOKENS = Counter(
    "first_site_agent_completion_tokens_total",
    "Completion tokens billed in the Final records this agent wrote, by model",
    ["model"],
)
FIRST_CHUNK = Histogram(
    "first_site_agent_first_chunk_seconds",
    "Time to first token: from delivery to the first chunk written to the stream (streamed only)",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
LATENCY = Histogram(
    "first_site_agent_request_seconds",
    "From delivery to the Final record written",
    ["model"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_WAIT = Histogram(
    "first_site_agent_queue_wait_seconds",
    "From the request's creation at the gateway (created_at) to its delivery to this agent",
    ["priority"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
FORGED = Counter(
    "first_site_agent_forged_total",
    "Work or control messages dead-lettered unrun: their publisher (user_id) is not a router",
    ["kind"],
)
IN_FLIGHT = Gauge("first_site_agent_in_flight", "Deliveries being handled now")


@dataclass
class Timing:
    """When one delivery arrived, and whether its first chunk was written yet."""

    model: str
    delivered: float
    """time.monotonic() at delivery."""
    delivered_at: float
    """time.time() at delivery (comparable with RunInference.created_at)."""
    first_chunk: bool = False


_timing: ContextVar[Timing | None] = ContextVar("first_site_agent_timing", default=None)


@contextlib.contextmanager
def track(request: RunInference) -> Iterator[Timing]:
    """Count the delivery in flight and time it while the block runs."""
    timing = Timing(request.model, time.monotonic(), time.time())
    token = _timing.set(timing)
    IN_FLIGHT.inc()
    try:
        yield timing
    finally:
        IN_FLIGHT.dec()
        _timing.reset(token)


def written(records: tuple[Record, ...]) -> None:
    """Observe the time to first token when the delivery's first chunk was just written."""
    timing = _timing.get()
    if timing is None or timing.first_chunk:
        return
    if any(isinstance(record, Chunk) for record in records):
        timing.first_chunk = True
        FIRST_CHUNK.labels(timing.model).observe(time.monotonic() - timing.delivered)


def finished(request: RunInference, final: Final) -> None:
    """Count a Final this agent wrote: outcome, tokens, latency and queue wait."""
    REQUESTS.labels(request.model, final.outcome).inc()
    PROMPT_TOKENS.labels(request.model).inc(final.usage.prompt_tokens)
    COMPLETION_TOKENS.labels(request.model).inc(final.usage.completion_tokens)
    timing = _timing.get()
    if timing is not None:
        LATENCY.labels(request.model).observe(time.monotonic() - timing.delivered)
        QUEUE_WAIT.labels(request.priority).observe(
            max(0.0, timing.delivered_at - request.created_at)
        )


def _backend_families(backends: Backends | None) -> list[Metric]:
    up = GaugeMetricFamily(
        "first_site_agent_backend_up",
        "1 if the vLLM instance answered its last /health probe (or was not probed yet), else 0",
        labels=["model", "instance"],
    )
    if backends is not None:
        for model, pool in sorted(backends.pools.items()):
            for instance in pool.instances:
                up.add_metric([model, instance.url], 1.0 if instance.healthy else 0.0)
    return [up]


BACKENDS: Constant = ScrapeCollector(_backend_families)
"""The instances' health at scrape time; the app attaches its Backends while it runs."""
REGISTRY.register(BACKENDS)
