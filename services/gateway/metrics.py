"""Prometheus series of the gateway (names documented in the README)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "first_gateway_requests_total",
    "Requests answered, by endpoint and HTTP status",
    ["endpoint", "status"],
)
FIRST_RECORD = Histogram(
    "first_gateway_first_record_seconds",
    "From admission to the first stream record (queueing + time to first token)",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
LATENCY = Histogram(
    "first_gateway_request_seconds",
    "From admission to the last byte of the response",
    ["endpoint"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
IN_FLIGHT = Gauge("first_gateway_in_flight", "Requests published and not yet finished")
