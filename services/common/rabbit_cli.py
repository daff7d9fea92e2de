"""`first rabbit setup`: declare the topology and make one least-privilege user per component."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Annotated

import httpx
import typer

from services.common import topology
from services.common.broker import make_broker
from services.common.rabbit_access import (
    ManagementApi,
    SetupError,
    apply,
    env_lines,
    plan,
    vhost_of,
)
from services.common.setup_options import OutOption, PrefixOption, RotateOption, hand_out

rabbit_app = typer.Typer(no_args_is_help=True)


async def declare_all(admin_url: str, sites: list[str], timeout_s: float) -> None:
    """Declare the core topology and each site's queues, as the administrator."""
    broker = make_broker(admin_url)
    await asyncio.wait_for(broker.connect(), timeout_s)
    try:
        targets: list[str | None] = [*sites] or [None]
        for site in targets:
            await asyncio.wait_for(topology.declare_topology(broker, site_id=site), timeout_s)
    finally:
        await broker.stop()


def management_url(admin_url: str) -> str:
    """Return the management API's URL on the broker's host (port 15672)."""
    host = urllib.parse.urlsplit(admin_url).hostname or "127.0.0.1"
    return f"http://{host}:15672/api"


@rabbit_app.command("setup")
def setup(
    admin_url: Annotated[
        str,
        typer.Option(
            envvar="FIRST_RABBIT_ADMIN_URL",
            help="AMQP URL of an administrator, with the vhost to set up (e.g. amqp://admin:pw@host:5672/first).",
        ),
    ],
    site: Annotated[
        list[str], typer.Option(help="A site id: letters, digits, _ and - (repeat for each).")
    ] = [],  # noqa: B006
    producer: Annotated[
        list[str],
        typer.Option(
            help="A producer name: letters, digits, _ and - (repeat); its user may write only "
            "to first.ingress and use its own reply queues."
        ),
    ] = [],  # noqa: B006
    api_url: Annotated[
        str | None, typer.Option(help="Management API (default http://<host>:15672/api).")
    ] = None,
    prefix: PrefixOption = "first-",
    rotate: RotateOption = False,
    out: OutOption = None,
    timeout_s: Annotated[float, typer.Option(help="Bound on each broker call.")] = 10.0,
) -> None:
    """Declare every exchange and queue, and make the users gateway, router, accounting,
    site-<id> and producer-<name> with the least permissions each needs; print their env and
    whom each trusts (FIRST_ROUTER_SITE_USER_PREFIX, FIRST_SITE_AGENT_ROUTER_USERS, ...)."""
    try:
        grants = plan(prefix, site, producer)
    except ValueError as exc:
        typer.echo(f"rabbit setup: {exc}", err=True)
        raise typer.Exit(2) from None
    parts = urllib.parse.urlsplit(admin_url)
    auth = (
        urllib.parse.unquote(parts.username or "guest"),
        urllib.parse.unquote(parts.password or "guest"),
    )
    try:
        asyncio.run(declare_all(admin_url, site, timeout_s))
        with httpx.Client(
            base_url=api_url or management_url(admin_url), auth=auth, timeout=timeout_s
        ) as client:
            accounts = apply(ManagementApi(client, vhost_of(admin_url)), grants, rotate=rotate)
    except (SetupError, httpx.HTTPError, OSError, TimeoutError) as exc:
        typer.echo(f"rabbit setup failed: {exc}", err=True)
        raise typer.Exit(1) from None
    hand_out(env_lines(admin_url, accounts, prefix), out)
    typer.echo(
        f"declared the topology of vhost {vhost_of(admin_url)!r}; {len(accounts)} users", err=True
    )
