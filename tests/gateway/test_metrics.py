"""The gateway counts every answer by route and status, logs one access line per API call,
and counts tokens from the record that ends what it reads of a request."""

from __future__ import annotations

import json

from prometheus_client import REGISTRY

from schemas.records import ErrorInfo, Failure, Final, Response, Usage
from services.gateway import metrics
from tests.common.helpers import capture_json
from tests.gateway.conftest import GatewayUnderTest


def requests(endpoint: str, status: int) -> float:
    labels = {"endpoint": endpoint, "status": str(status)}
    return REGISTRY.get_sample_value("first_gateway_requests_total", labels) or 0.0


def tokens(kind: str, model: str) -> float:
    name = f"first_gateway_{kind}_tokens_total"
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


async def test_successes_and_errors_are_counted_by_route_template_and_status(
    gateway: GatewayUnderTest,
) -> None:
    auth = {"authorization": f"Bearer {gateway.key}"}
    cases = [
        ("GET", "/v1/models", auth, "/v1/models", 200),
        ("POST", "/v1/chat/completions", {}, "/v1/chat/completions", 401),
        ("GET", "/v1/models/no-such-model", auth, "/v1/models/{model:path}", 404),
        ("GET", "/v1/no-such-route", auth, "unmatched", 404),
        ("GET", "/health", {}, "/health", 200),
    ]
    before = [requests(endpoint, status) for *_, endpoint, status in cases]
    for method, path, headers, _endpoint, status in cases:
        response = await gateway.client.request(method, path, headers=headers)
        assert response.status_code == status, (path, response.text)
    after = [requests(endpoint, status) for *_, endpoint, status in cases]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1] * len(cases)


async def test_each_api_call_logs_one_json_access_line_with_the_caller_and_ops_routes_none(
    gateway: GatewayUnderTest,
) -> None:
    auth = {"authorization": f"Bearer {gateway.key}"}
    with capture_json() as logs:
        assert (await gateway.client.get("/v1/models", headers=auth)).status_code == 200
        assert (await gateway.client.get("/metrics")).status_code == 200
        assert (await gateway.client.get("/v1/models")).status_code == 401
    access = [line for line in logs.lines() if line["logger"] == "services.gateway.middleware"]
    assert [line["msg"].split(" in ")[0] for line in access] == [
        "GET /v1/models 200",
        "GET /v1/models 401",
    ]
    assert access[0]["user_id"] == "alice"
    assert "user_id" not in access[1]  # not authenticated: no caller to name
    assert all(line["level"] == "INFO" for line in access)


def test_tokens_are_counted_from_a_final_or_a_whole_responses_usage() -> None:
    model = "count-tokens-model"
    prompt, completion = tokens("prompt", model), tokens("completion", model)
    final = Final(
        outcome="completed",
        usage=Usage(prompt_tokens=5, completion_tokens=3),
        site_id="s",
        finished_at=0.0,
    )
    metrics.count_tokens(model, final)
    body = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}}
    metrics.count_tokens(model, Response(status=200, body=json.dumps(body).encode()))
    embedding = {"data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    metrics.count_tokens(model, Response(status=200, body=json.dumps(embedding).encode()))
    # Nothing to count: an upstream error, a body that is not JSON, a failure record.
    metrics.count_tokens(model, Response(status=400, body=json.dumps(body).encode()))
    metrics.count_tokens(model, Response(status=200, body=b"not json"))
    error = ErrorInfo(status=502, message="x", type="server_error")
    metrics.count_tokens(model, Failure(error=error))
    assert tokens("prompt", model) - prompt == 5 + 11 + 4
    assert tokens("completion", model) - completion == 3 + 2
