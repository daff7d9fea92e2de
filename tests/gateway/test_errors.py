"""Bad input gets OpenAI's error shape with the right status, and publishes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from schemas import names
from tests.gateway.conftest import GatewayUnderTest

CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def requests_queue_depth(gateway_space: tuple[str, str]) -> AsyncIterator[Any]:
    connection = await aio_pika.connect(gateway_space[0], timeout=10)
    channel = await connection.channel()

    async def depth() -> int:
        queue = await channel.declare_queue(names.ROUTER_REQUESTS_QUEUE, passive=True)
        count: int = queue.declaration_result.message_count
        return count

    yield depth
    await connection.close()


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


async def test_missing_key_is_401(gateway: GatewayUnderTest, requests_queue_depth: Any) -> None:
    response = await gateway.client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(response, 401, "missing_api_key")
    assert await requests_queue_depth() == 0


async def test_wrong_key_is_401(gateway: GatewayUnderTest, requests_queue_depth: Any) -> None:
    headers = {"authorization": "Bearer first-nope-nope"}
    response = await gateway.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert_openai_error(response, 401, "invalid_api_key")
    response = await gateway.client.get("/v1/models", headers=headers)
    assert_openai_error(response, 401, "invalid_api_key")
    assert await requests_queue_depth() == 0


async def test_unknown_model_is_404(gateway: GatewayUnderTest, requests_queue_depth: Any) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    body = CHAT | {"model": "gpt-17"}
    response = await gateway.client.post("/v1/chat/completions", json=body, headers=headers)
    error = assert_openai_error(response, 404, "model_not_found")
    assert error["param"] == "model"
    assert "gpt-17" in error["message"]
    assert await requests_queue_depth() == 0


async def test_known_model_without_live_site_is_503_with_retry_after(
    gateway: GatewayUnderTest, requests_queue_depth: Any
) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    response = await gateway.client.post(
        "/v1/completions", json={"model": "smollm2-135m", "prompt": "x"}, headers=headers
    )
    assert_openai_error(response, 503, "no_site_available")
    assert response.headers["retry-after"] == str(gateway.settings.retry_after_s)
    assert await requests_queue_depth() == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "smollm2-135m", "messages": "hi"}', "messages"),
        (b'{"model": "smollm2-135m"}', "messages"),
        (
            b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}],'
            b' "stream": "yes"}',
            "stream",
        ),
    ],
)
async def test_schema_violation_is_400_naming_the_field(
    gateway: GatewayUnderTest, requests_queue_depth: Any, body: bytes, param: str
) -> None:
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    response = await gateway.client.post("/v1/chat/completions", content=body, headers=headers)
    error = assert_openai_error(response, 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert await requests_queue_depth() == 0


async def test_malformed_json_is_400(gateway: GatewayUnderTest, requests_queue_depth: Any) -> None:
    headers = {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"}
    response = await gateway.client.post("/v1/embeddings", content=b'{"model": ', headers=headers)
    assert_openai_error(response, 400, "invalid_json")
    assert await requests_queue_depth() == 0


async def test_body_over_limit_is_413(gateway: GatewayUnderTest, requests_queue_depth: Any) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    big = CHAT | {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = await gateway.client.post("/v1/chat/completions", json=big, headers=headers)
    assert_openai_error(response, 413)

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: the limit still holds
        for _ in range(10):
            yield b" " * 500

    response = await gateway.client.post("/v1/chat/completions", content=chunked(), headers=headers)
    assert_openai_error(response, 413)
    assert await requests_queue_depth() == 0


async def test_unknown_route_is_404_in_openai_shape(gateway: GatewayUnderTest) -> None:
    response = await gateway.client.get("/v1/nothing-here")
    assert_openai_error(response, 404, "not_found")


async def test_models_list_is_empty_without_live_sites(gateway: GatewayUnderTest) -> None:
    headers = {"authorization": f"Bearer {gateway.key}"}
    response = await gateway.client.get("/v1/models", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": []}


async def test_usage_report_is_for_admin_keys_only(gateway: GatewayUnderTest) -> None:
    response = await gateway.client.get(
        "/v1/usage/report", headers={"authorization": f"Bearer {gateway.key}"}
    )
    assert_openai_error(response, 403, "admin_only")


async def test_usage_report_rejects_unknown_grouping_and_bad_dates(
    gateway: GatewayUnderTest,
) -> None:
    headers = {"authorization": f"Bearer {gateway.admin_key}"}
    response = await gateway.client.get("/v1/usage/report?by=colour", headers=headers)
    assert assert_openai_error(response, 400)["param"] == "by"
    response = await gateway.client.get("/v1/usage/report?since=yesterday", headers=headers)
    assert assert_openai_error(response, 400)["param"] == "since"
