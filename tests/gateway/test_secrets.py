"""Credentials never reach logs (at any level), metric labels or error messages."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from services.common.logging import quiet_libraries
from tests.access.test_globus_auth import MODELS, bearer, globus_settings
from tests.gateway.conftest import ApiKeyFor, MakeGateway, live_site
from tests.gateway.globus_fake import mint, revoke

SECRET_WORDS = ("hunter2-prompt-text",)


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": SECRET_WORDS[0]}]}


async def test_no_credential_or_prompt_appears_in_logs_metrics_or_errors(
    fake_globus: str,
    make_gateway: MakeGateway,
    api_key_for: ApiKeyFor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # our own loggers at their most verbose
    quiet_libraries()  # as configure_logging leaves the transport libraries in every service
    replica = await make_gateway(first_record_timeout_s=0.3, **globus_settings(fake_globus))
    await live_site(replica.redis, [m.name for m in MODELS])
    key = await api_key_for(replica, "alice")
    token = mint(fake_globus, "jo@anl.gov")
    revoked = mint(fake_globus, "kim@anl.gov")
    revoke(fake_globus, revoked)
    wrong_key = key[:-4] + "XXXX"
    replies: list[httpx.Response] = []
    for credential in (key, token, revoked, wrong_key, "first-garbage", "not-even-a-token"):
        client, headers = replica.client, bearer(credential)
        replies.append(await client.get("/v1/models", headers=headers))
        for model in ("open-model", "group-model"):
            replies.append(
                await client.post("/v1/chat/completions", json=chat(model), headers=headers)
            )
    replies.append(await replica.client.get("/metrics"))
    statuses = {r.status_code for r in replies}
    assert {200, 401, 404, 504} <= statuses  # every path ran: served, refused, hidden, timed out
    secrets = (key, token, revoked, wrong_key, "first-garbage", "not-even-a-token", *SECRET_WORDS)
    logged = caplog.text
    assert logged  # the requests were logged (so the check below can fail)
    for secret in secrets:
        assert secret not in logged
        for reply in replies:
            assert secret not in reply.text
            assert all(secret not in value for value in reply.headers.values())
