"""Prometheus series of the gateway (names documented in the README, section Metrics)."""

from __future__ import annotations

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from schemas.records import AnyRecord, Final, Response, Usage

REQUESTS = Counter(
    "first_gateway_requests_total",
    "HTTP requests answered, by route (its path template) and status",
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
PROMPT_TOKENS = Counter(
    "first_gateway_prompt_tokens_total",
    "Prompt tokens of the requests answered, as the stream's Final record reports them, by model",
    ["model"],
)
COMPLETION_TOKENS = Counter(
    "first_gateway_completion_tokens_total",
    "Completion tokens of the requests answered, as the stream's Final record reports them",
    ["model"],
)


class _Body(msgspec.Struct):
    usage: Usage | None = None


_body_decoder = msgspec.json.Decoder(_Body)


def count_tokens(model: str, record: AnyRecord) -> None:
    """Count the tokens a request's last record read by the gateway reports.

    A stream's Final carries what was billed; a non-streamed answer is read only up to its
    Response, whose body (vLLM's, unchanged) carries the same usage.
    """
    if isinstance(record, Final):
        usage = record.usage
    elif isinstance(record, Response) and record.status < 400:
        try:
            usage = _body_decoder.decode(record.body).usage or Usage()
        except msgspec.DecodeError:
            return
    else:
        return
    PROMPT_TOKENS.labels(model).inc(usage.prompt_tokens)
    COMPLETION_TOKENS.labels(model).inc(usage.completion_tokens)
