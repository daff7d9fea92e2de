"""`GET /v1/usage/report`: the ledger's report over HTTP, for admin keys (JSON or CSV).

The gateway serves it because it is the authenticated edge; the query itself is the
accounting package's (the ledger shares the gateway's database by default).
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter
from fastapi.responses import Response

from services.accounting.errors import LedgerUnavailable
from services.accounting.reports import REPORT_BYS, ReportBy, ReportFormat, render, usage_report
from services.gateway.errors import InvalidRequest, PermissionDenied, Unavailable
from services.gateway.routes import GatewayDep, PrincipalDep

router = APIRouter()

_MEDIA = {"json": "application/json", "csv": "text/csv; charset=utf-8"}


def _since(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"`since` must be a date YYYY-MM-DD, not {value!r}.", param="since"
        ) from None


@router.get("/v1/usage/report")
async def report(
    gw: GatewayDep,
    principal: PrincipalDep,
    by: str = "user",
    since: str | None = None,
    format: str = "json",
) -> Response:
    if not principal.is_admin:
        raise PermissionDenied("Usage reports are for admin keys.", code="admin_only")
    if by not in REPORT_BYS:
        raise InvalidRequest(f"`by` must be one of {', '.join(REPORT_BYS)}.", param="by")
    if format not in _MEDIA:
        raise InvalidRequest("`format` must be json or csv.", param="format")
    group: ReportBy = by
    try:
        rows = await usage_report(gw.engine, group, _since(since))
    except LedgerUnavailable as exc:
        raise Unavailable(
            "The ledger is unavailable; retry later.", code="ledger_unavailable"
        ) from exc
    fmt: ReportFormat = "csv" if format == "csv" else "json"
    return Response(render(rows, fmt, group), media_type=_MEDIA[format])
