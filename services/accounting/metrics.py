"""Prometheus series of the accounting service (names documented in the README, section Metrics)."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Histogram

RESULTS: Final = ("recorded", "duplicate", "rejected", "requeued")
EVENTS: Final = Counter(
    "first_accounting_usage_events",
    "Usage events the accounting consumer settled, by result",
    ["result"],
)
for _result in RESULTS:
    EVENTS.labels(_result)  # export every series from the start, at zero

LEDGER_WRITE: Final = Histogram(
    "first_accounting_ledger_write_seconds",
    "Time to write one usage event to the ledger, retries included, by result",
    ["result"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
for _result in ("recorded", "duplicate", "unavailable"):
    LEDGER_WRITE.labels(_result)
