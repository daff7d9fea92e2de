"""`first usage …`: token reports from the ledger on the command line."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

import typer

from services.accounting.errors import AccountingError
from services.accounting.reports import ReportBy, ReportFormat, ReportRow, render, usage_report
from services.accounting.settings import Settings
from services.common.db import make_engine

usage_app = typer.Typer(no_args_is_help=True)


@usage_app.callback()
def usage() -> None:
    """Token usage from the accounting ledger."""


async def _report(
    database_url: str, by: ReportBy, since: dt.date | None, user_id: str | None
) -> list[ReportRow]:
    engine = make_engine(database_url)
    try:
        return await usage_report(engine, by, since=since, user_id=user_id)
    finally:
        await engine.dispose()


@usage_app.command("report")
def report(
    by: Annotated[ReportBy, typer.Option(help="Group by this.")] = "user",
    since: Annotated[
        dt.datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Only requests finished on or after this UTC day.",
        ),
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="Output format.")] = "table",
    user: Annotated[str | None, typer.Option(help="Only this user_id.")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="SQLAlchemy URL of the ledger (default: FIRST_ACCOUNTING_DATABASE_URL, "
            "else sqlite+aiosqlite:///.first/first.db).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print requests and tokens summed per user, model, site, UTC day or kind."""
    url = database_url or Settings().database_url
    day = since.date() if since is not None else None
    try:
        rows = asyncio.run(_report(url, by, day, user))
    except AccountingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(render(rows, fmt, by), nl=False)
