"""HTTP routes of the OpenAI surface (thin: each delegates to the domain modules)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from services.access.auth import Authenticator
from services.access.policy import may_use
from services.access.principal import Principal
from services.access.validation import ChatRequest, CompletionRequest, EmbeddingRequest
from services.common.logging import user_id_var
from services.gateway.inference import Gateway, handle, model_not_found
from services.gateway.registry import overall_state, serving_sites, site_states

router = APIRouter()

# The bodies the routes read themselves (msgspec, not FastAPI parameters) are documented in
# the OpenAPI schema from the same msgspec types, so clients and the fuzz test see them.
_BODIES, OPENAPI_COMPONENTS = msgspec.json.schema_components(
    (ChatRequest, CompletionRequest, EmbeddingRequest),
    ref_template="#/components/schemas/{name}",
)


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


async def get_gateway(request: Request) -> Gateway:
    # async: a plain `def` dependency would run in the threadpool on every request
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.authenticate(authorization)
    user_id_var.set(principal.user_id)  # every log line of this request names its caller
    return principal


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


@router.post("/v1/chat/completions", openapi_extra=_body(_BODIES[0]))
async def chat_completions(request: Request, gw: GatewayDep, principal: PrincipalDep) -> Response:
    return await handle(gw, request, "chat.completions", principal)


@router.post("/v1/completions", openapi_extra=_body(_BODIES[1]))
async def completions(request: Request, gw: GatewayDep, principal: PrincipalDep) -> Response:
    return await handle(gw, request, "completions", principal)


@router.post("/v1/embeddings", openapi_extra=_body(_BODIES[2]))
async def embeddings(request: Request, gw: GatewayDep, principal: PrincipalDep) -> Response:
    return await handle(gw, request, "embeddings", principal)


async def _served_models(gw: Gateway, principal: Principal) -> list[dict[str, Any]]:
    sites = await gw.registry.sites()
    now = time.time()
    out = []
    for entry in gw.access.settings.models:
        if not may_use(principal, entry):
            continue  # as if it did not exist
        serving = serving_sites(sites, entry.name, now, gw.settings.site_ttl_s, entry.sites)
        if serving:
            states = site_states(serving, entry.name)
            out.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": int(min(s.sent_at for s in serving)),
                    "owned_by": entry.owned_by,
                    "max_model_len": entry.context_length,
                    "sites": sorted(s.site_id for s in serving),
                    # FIRST's own fields: a cold model is listed (a site may start it; the
                    # first request waits for it), with where it is hot, starting or cold.
                    "state": overall_state(states),
                    "site_states": dict(sorted(states.items())),
                }
            )
    return out


@router.get("/v1/models")
async def list_models(gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"object": "list", "data": await _served_models(gw, principal)}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, gw: GatewayDep, principal: PrincipalDep) -> dict[str, Any]:
    for entry in await _served_models(gw, principal):
        if entry["id"] == model:
            return entry
    raise model_not_found(model)
