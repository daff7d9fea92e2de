"""A local stand-in for Globus Auth and Globus Groups, speaking the parts of their protocol we use.

Tests and `first dev` point globus-sdk at it (its `base_url`), so the gateway runs the same
globus-sdk calls it makes in production and nothing reaches globus.org:

    POST /v2/oauth2/token/introspect   client credentials (HTTP Basic), form `token`, `include`
    POST /v2/oauth2/token              grant_type=urn:globus:auth:grant_type:dependent_token
    GET  /v2/groups/my_groups          Bearer <a groups token from the dependent grant>

and, for the tests and the demo only (loopback; never part of the real services):

    POST /fake/tokens   {"username", "groups", "expires_in", "aud", "scope"} -> {"access_token"}
    POST /fake/revoke   {"token"}         -> the token introspects as inactive from now on
    GET  /fake/stats                      -> how many introspections and group lookups it served

Run: `first fake-globus --port 8040 --client-id ID --client-secret SECRET`.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

DEPENDENT_GRANT = "urn:globus:auth:grant_type:dependent_token"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"


class TokenSpec(msgspec.Struct, kw_only=True):
    """What a test asks the fake to mint."""

    username: str
    groups: list[str] = []
    expires_in: int = 3600
    aud: list[str] | None = None
    scope: str | None = None
    sub: str | None = None


@dataclass
class Issued:
    """One minted access token and who it belongs to."""

    sub: str
    username: str
    groups: list[str]
    aud: list[str]
    scope: str
    client_id: str
    issued_at: int
    expires_at: int
    revoked: bool = False


@dataclass
class FakeGlobus:
    """The fake's state: minted tokens, derived group tokens, counters."""

    client_id: str
    client_secret: str
    tokens: dict[str, Issued] = field(default_factory=dict)
    group_tokens: dict[str, str] = field(default_factory=dict)
    introspections: int = 0
    group_lookups: int = 0

    def mint(self, spec: TokenSpec) -> str:
        now = int(time.time())
        token = secrets.token_urlsafe(32)
        self.tokens[token] = Issued(
            sub=spec.sub or str(uuid.uuid5(uuid.NAMESPACE_URL, spec.username)),
            username=spec.username,
            groups=list(spec.groups),
            aud=spec.aud if spec.aud is not None else [self.client_id],
            scope=spec.scope
            if spec.scope is not None
            else f"https://auth.globus.org/scopes/{self.client_id}/all",
            client_id=str(uuid.uuid4()),
            issued_at=now,
            expires_at=now + spec.expires_in,
        )
        return token

    def client_ok(self, authorization: str | None) -> bool:
        if not authorization or not authorization.lower().startswith("basic "):
            return False
        try:
            raw = base64.b64decode(authorization[6:]).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        client_id, _, secret = raw.partition(":")
        return secrets.compare_digest(client_id, self.client_id) and secrets.compare_digest(
            secret, self.client_secret
        )

    def introspect(self, token: str, include: str) -> dict[str, Any]:
        self.introspections += 1
        issued = self.tokens.get(token)
        if issued is None or issued.revoked or issued.expires_at <= time.time():
            return {"active": False}
        body: dict[str, Any] = {
            "active": True,
            "token_type": "Bearer",
            "scope": issued.scope,
            "client_id": issued.client_id,
            "sub": issued.sub,
            "username": issued.username,
            "name": issued.username.split("@", 1)[0],
            "email": issued.username,
            "aud": issued.aud,
            "iss": "https://auth.globus.org",
            "exp": issued.expires_at,
            "iat": issued.issued_at,
            "nbf": issued.issued_at,
        }
        if "identity_set" in include.split(","):
            body["identity_set"] = [issued.sub]
        return body


def _auth_error(status: int, message: str) -> JSONResponse:
    # Globus Auth's error document shape.
    return JSONResponse(
        {"errors": [{"status": str(status), "code": "UNAUTHORIZED", "detail": message}]},
        status_code=status,
    )


def create_app(client_id: str, client_secret: str) -> FastAPI:
    """Return the fake's app for one confidential client (the gateway's)."""
    state = FakeGlobus(client_id=client_id, client_secret=client_secret)
    app = FastAPI(title="fake Globus Auth + Groups", docs_url=None, redoc_url=None)
    app.state.fake = state

    @app.post("/v2/oauth2/token/introspect")
    async def introspect(request: Request) -> Response:
        if not state.client_ok(request.headers.get("authorization")):
            return _auth_error(401, "Client authentication failed")
        form = await request.form()
        token = str(form.get("token") or "")
        return JSONResponse(state.introspect(token, str(form.get("include") or "")))

    @app.post("/v2/oauth2/token")
    async def token(request: Request) -> Response:
        if not state.client_ok(request.headers.get("authorization")):
            return _auth_error(401, "Client authentication failed")
        form = await request.form()
        if form.get("grant_type") != DEPENDENT_GRANT:
            return _auth_error(400, "unsupported grant_type")
        issued = state.tokens.get(str(form.get("token") or ""))
        if issued is None or issued.revoked or issued.expires_at <= time.time():
            return _auth_error(401, "invalid_grant")
        groups_token = secrets.token_urlsafe(24)
        state.group_tokens[groups_token] = str(form.get("token"))
        return JSONResponse(
            [
                {
                    "scope": GROUPS_SCOPE,
                    "access_token": groups_token,
                    "token_type": "bearer",
                    "expires_in": 120,
                    "resource_server": "groups.api.globus.org",
                }
            ]
        )

    @app.get("/v2/groups/my_groups")
    async def my_groups(request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        parent = state.group_tokens.get(authorization.removeprefix("Bearer "))
        issued = state.tokens.get(parent or "")
        if issued is None:
            return _auth_error(401, "invalid token")
        state.group_lookups += 1
        return JSONResponse(
            [
                {
                    "id": group,
                    "name": group,
                    "group_type": "regular",
                    "my_memberships": [
                        {
                            "group_id": group,
                            "identity_id": issued.sub,
                            "username": issued.username,
                            "role": "member",
                            "status": "active",
                        }
                    ],
                }
                for group in issued.groups
            ]
        )

    @app.post("/fake/tokens")
    async def mint(request: Request) -> dict[str, Any]:
        spec = msgspec.json.decode(await request.body(), type=TokenSpec)
        return {"access_token": state.mint(spec)}

    @app.post("/fake/revoke")
    async def revoke(request: Request) -> dict[str, Any]:
        body = msgspec.json.decode(await request.body(), type=dict[str, str])
        issued = state.tokens.get(body.get("token", ""))
        if issued is not None:
            issued.revoked = True
        return {"revoked": issued is not None}

    @app.get("/fake/stats")
    async def stats() -> dict[str, int]:
        return {"introspections": state.introspections, "group_lookups": state.group_lookups}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
