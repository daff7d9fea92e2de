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

# Observed per event, not per transaction: it is the latency each event sees before its
# ack, and its count stays the number of events. How events share transactions is
# LEDGER_BATCH's to say.
LEDGER_WRITE: Final = Histogram(
    "first_accounting_ledger_write_seconds",
    "Time from handing one usage event to the ledger writer until the transaction holding "
    "its row committed (waits for the transaction in flight and retries included), by result",
    ["result"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
for _result in ("recorded", "duplicate", "unavailable"):
    LEDGER_WRITE.labels(_result)

LEDGER_BATCH: Final = Histogram(
    "first_accounting_ledger_batch_events",
    "Usage events per committed ledger transaction, duplicates included",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)

LEDGER_CONFLICTS: Final = Counter(
    "first_accounting_ledger_conflicts",
    "Usage events refused because their request_id is billed to another user (parked in "
    "usage_conflicts)",
)
