"""`first dev`'s RabbitMQ: a vhost of its own and one least-privilege user per component.

The demo runs as production would: the administrator (the URL `first dev` was given, guest on
a fresh install) declares the topology on vhost `first-dev` and makes the users with the code
of `first rabbit setup`; every service then runs as its own user. New passwords every run.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path

import httpx

from services.common.broker import amqp_user
from services.common.private_file import write_private
from services.common.rabbit_access import ManagementApi, apply, env_lines, envs, plan
from services.common.rabbit_cli import declare_all, management_url

DEV_VHOST = "first-dev"
DEV_PREFIX = "first-dev-"
DEV_PRODUCER = "dev"
SERVICE_OF_ROLE = {"site": "site_agent", "producer": "producer"}
"""The stack's service name of a role, where it is not the role's name."""


def dev_rabbit_users(
    admin_url: str,
    site_id: str,
    env_file: Path,
    *,
    vhost: str = DEV_VHOST,
    prefix: str = DEV_PREFIX,
    api_url: str | None = None,
    timeout_s: float = 10.0,
) -> dict[str, dict[str, str]]:
    """Set up `vhost` as the administrator of `admin_url`; return each service's env.

    Every component's env (the dev producer's too) is also written to `env_file`, mode 0600.
    """
    parts = urllib.parse.urlsplit(admin_url)
    vhost_url = urllib.parse.urlunsplit(
        parts._replace(path="/" + urllib.parse.quote(vhost, safe=""))
    )
    auth = (amqp_user(admin_url), urllib.parse.unquote(parts.password or "guest"))
    grants = plan(prefix, [site_id], [DEV_PRODUCER])
    base_url = api_url or management_url(admin_url)
    with httpx.Client(base_url=base_url, auth=auth, timeout=timeout_s) as client:
        api = ManagementApi(client, vhost)
        api.ensure_vhost()
        api.permit_all(auth[0])
        asyncio.run(declare_all(vhost_url, [site_id], timeout_s))
        accounts = apply(api, grants, rotate=True)
    write_private(env_file, "\n".join(env_lines(vhost_url, accounts, prefix)) + "\n")
    return {
        SERVICE_OF_ROLE.get(grant.role, grant.role): env
        for grant, env in envs(vhost_url, accounts, prefix)
    }
