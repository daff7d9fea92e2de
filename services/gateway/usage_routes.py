"""`GET /v1/usage`: a caller's own usage and limits; `GET /v1/usage/report`: the ledger's report
over HTTP, for admins (JSON or CSV).

The gateway serves it because it is the authenticated edge; the query itself is the
accounting package's (the ledger shares the gateway's database by default).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from services.access.errors import InvalidRequest, PermissionDenied, Unavailable
from services.access.principal import Principal
from services.accounting.errors import LedgerUnavailable
from services.accounting.reports import (
    REPORT_BYS,
    ReportBy,
    ReportFormat,
    ReportRow,
    render,
    usage_report,
)
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


@router.get("/v1/usage")
async def own_usage(gw: GatewayDep, principal: PrincipalDep, user: str | None = None) -> Any:
    """The caller's usage today and this month (UTC, from the ledger) and every limit with
    what is left of it. Admins may name any `user` (its group allocations are then not shown:
    a user's groups are known only from their own credential)."""
    subject = principal
    if user is not None and user != principal.user_id:
        if not principal.is_admin:
            raise PermissionDenied("Only admins may read another user's usage.", code="admin_only")
        subject = Principal(user_id=user, username=user)
    today = dt.datetime.now(dt.UTC).date()
    month_start = today.replace(day=1)
    try:
        day_rows = await usage_report(gw.engine, "user", today, user_id=subject.user_id)
        month_rows = await usage_report(gw.engine, "user", month_start, user_id=subject.user_id)
    except LedgerUnavailable as exc:
        raise Unavailable(
            "The ledger is unavailable; retry later.", code="ledger_unavailable"
        ) from exc
    return {
        "object": "usage",
        "user_id": subject.user_id,
        "day": today.isoformat(),
        "month": month_start.strftime("%Y-%m"),
        "usage": {"day": _totals(day_rows), "month": _totals(month_rows)},
        "limits": await gw.access.quotas.status(subject),
        "at": time.time(),
    }


def _totals(rows: list[ReportRow]) -> dict[str, int]:
    return {
        "requests": sum(r.requests for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "total_tokens": sum(r.total_tokens for r in rows),
    }
