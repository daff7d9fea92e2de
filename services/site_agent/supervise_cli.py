"""`first sites supervise FILE`: keep every site's agent running on Globus Compute.

The file's format is described in services/site_agent/supervise.py. Redis and logging come from
the shared settings (FIRST_REDIS_URL, FIRST_LOG_LEVEL, FIRST_LOG_JSON). Globus credentials come
from the SDK's token store (~/.globus_compute, filled by one interactive login) or, for a service
identity, GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET. Without either, building an
executor starts an interactive login: it fails at once when stdin is not a terminal (each site's
submit then fails and backs off), and a terminal's prompt would hold a thread until answered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from pathlib import Path
from typing import Annotated

import typer

from services.common.logging import configure_logging
from services.common.redis import make_redis
from services.common.settings import CommonSettings
from services.site_agent.supervise import ExecutorFactory, Supervisor
from services.site_agent.supervise_config import SupervisorConfig, lease_command, load_config

sites_app = typer.Typer(no_args_is_help=True)


@sites_app.callback()
def sites() -> None:
    """Run site agents on the clusters' Globus Compute endpoints."""


def globus_executor(endpoint_id: str) -> concurrent.futures.Executor:
    """Return a Globus Compute executor for one endpoint (the SDK is imported only here)."""
    from globus_compute_sdk import Executor

    executor: concurrent.futures.Executor = Executor(
        endpoint_id=endpoint_id, label="first-supervisor"
    )
    return executor


async def supervise_until_signalled(
    config: SupervisorConfig, redis_url: str, factory: ExecutorFactory
) -> None:
    """Run a supervisor until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    redis = make_redis(redis_url)
    try:
        await Supervisor(config, redis, factory).run(stop)
    finally:
        await redis.aclose()


@sites_app.command("supervise")
def supervise(
    config_file: Annotated[Path, typer.Argument(help="The supervisor file (TOML).")],
    check: Annotated[
        bool, typer.Option("--check", help="Validate the file, print each lease command, exit.")
    ] = False,
) -> None:
    """Keep every site's agent running as leases on its Globus Compute endpoint.

    Run several for failover: one holds a Redis lock and acts, the others stand by.
    """
    try:
        config = load_config(config_file)
    except (OSError, ValueError) as exc:
        typer.echo(f"{config_file}: {exc}", err=True)
        raise typer.Exit(2) from exc
    if check:
        for site in config.sites:
            typer.echo(f"{site.site_id} @ {site.endpoint_id}: {lease_command(site)}")
        return
    settings = CommonSettings()
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(supervise_until_signalled(config, settings.redis_url, globus_executor))
