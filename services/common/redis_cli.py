"""`first redis setup`: make one least-privilege Redis user per component, on every server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import redis
import typer

from services.common.redis_access import Server, apply, env_lines, plan
from services.common.setup_options import OutOption, PrefixOption, RotateOption, hand_out

redis_app = typer.Typer(no_args_is_help=True)


@contextlib.contextmanager
def servers(admin_urls: list[str], timeout_s: float) -> Iterator[list[Server]]:
    """Connect to every server as its administrator; close them all afterwards."""
    made: list[Server] = []
    try:
        made.extend(Server(url, timeout_s) for url in admin_urls)
        yield made
    finally:
        for server in made:
            server.close()


@redis_app.command("setup")
def setup(
    admin_url: Annotated[
        list[str],
        typer.Option(
            envvar="FIRST_REDIS_ADMIN_URL",
            help="Redis URL of an administrator, with the database the services use "
            "(e.g. rediss://admin:pw@host:6379/0); repeat for each server (a replica, a "
            "failover target): ACL users live per server.",
        ),
    ],
    site: Annotated[list[str], typer.Option(help="A site id (repeat for each site).")] = [],  # noqa: B006
    producer: Annotated[
        list[str], typer.Option(help="A producer name (repeat); its user may only read streams.")
    ] = [],  # noqa: B006
    prefix: PrefixOption = "first-",
    rotate: RotateOption = False,
    out: OutOption = None,
    timeout_s: Annotated[float, typer.Option(help="Bound on each Redis call.")] = 10.0,
) -> None:
    """Make the users gateway, batch-worker, router, accounting, supervisor, keys, site-<id> and
    producer-<name> with the least permissions each needs; print each one's Redis URL."""
    try:
        acls = plan(prefix, site, producer)
        with servers(admin_url, timeout_s) as targets:
            accounts = apply(targets, acls, rotate=rotate)
            unsaved = [s.where for s in targets if not s.save()]
            open_default = [s.where for s in targets if s.open_default_user()]
    except (ValueError, redis.RedisError, OSError) as exc:
        typer.echo(f"redis setup failed: {exc}", err=True)
        raise typer.Exit(1) from None
    hand_out(env_lines(admin_url, accounts), out)
    typer.echo(f"{len(accounts)} users on {len(admin_url)} server(s)", err=True)
    for where in unsaved:
        typer.echo(
            f"warning: {where} has no ACL file, so the users live in its memory only and are "
            "gone after a restart: configure `aclfile` and rerun",
            err=True,
        )
    for where in open_default:
        typer.echo(
            f"warning: on {where} the `default` user needs no password, so anyone skips these "
            "ACLs: `ACL SETUSER default off` (or give it a password)",
            err=True,
        )
