"""Property-based fuzzing of the gateway's OpenAPI surface (schemathesis): never a 5xx.

The whole stack runs as processes against `first sim-vllm` (fast, so valid requests finish in
milliseconds) with `max_tokens` capped by the gateway. For every operation, schemathesis
generates valid (positive) and invalid (negative) requests from the gateway's own OpenAPI
schema, sent with a valid API key, a wrong key and none. A bounded number of examples per
operation and mode keeps the run to seconds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.faults.conftest import MakeStack

EXAMPLES = 25
# 503: a fuzzed model name that names no live site is "no site"; 504 cannot happen with the
# sim serving. Everything else at 5xx is a defect (the gateway's own 500 above all).
ALLOWED_5XX = {503}


def fuzz(base_url: str, schema: dict[str, Any], headers: dict[str, str], label: str) -> list[str]:
    """Run every operation in both modes; return what went wrong (empty: nothing)."""
    api = schemathesis.openapi.from_dict(schema)
    problems: list[str] = []
    session = requests.Session()
    session.trust_env = False  # loopback only; never a proxy
    seen: dict[int, int] = {}
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                reply = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
                seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
                if reply.status_code >= 500 and reply.status_code not in ALLOWED_5XX:
                    problems.append(
                        f"{case.method} {case.formatted_path} -> {reply.status_code}: "
                        f"{reply.text[:200]}"
                    )

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (an operation without parameters or body).
                assert mode is GenerationMode.NEGATIVE, operation.label
    if not seen:
        problems.append("nothing was sent")
    print(f"fuzz with {label}: statuses {dict(sorted(seen.items()))}")
    return problems


async def test_the_gateway_answers_fuzzed_requests_without_a_server_error(
    make_fault_stack: MakeStack,
) -> None:
    stack = await make_fault_stack(
        sim={"tokens_per_s": 2000, "ttft_ms": 1},
        env={"FIRST_ACCESS_MAX_TOKENS_CAP": "8", "FIRST_GATEWAY_NO_SITE_WAIT_S": "0.2"},
    )
    base_url = stack.config.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=base_url, timeout=10, trust_env=False) as http:
        schema = (await http.get("/openapi.json")).raise_for_status().json()
    credentials: dict[str, dict[str, str]] = {
        "a valid key": stack.headers(),
        "a wrong key": {"authorization": "Bearer first-wrong-key"},
        "no credential": {},
    }
    for label, headers in credentials.items():
        problems = await asyncio.wait_for(
            asyncio.to_thread(fuzz, base_url, schema, dict(headers), label), timeout=300
        )
        assert problems == [], "\n".join(problems)
