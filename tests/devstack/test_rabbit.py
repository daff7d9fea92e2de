"""`first dev` runs every component on its own RabbitMQ user, as `first rabbit setup` makes them."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.parse
from pathlib import Path

import aio_pika
import httpx

from schemas import names
from services.common.broker import amqp_user
from services.devstack.rabbit import dev_rabbit_users
from tests.conftest import RABBIT_API, RABBIT_URL, _rabbit_auth


async def read_site_queue(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(names.site_queue("local", "interactive"), passive=True)


def test_the_dev_stack_gets_one_user_per_component_on_a_vhost_of_its_own(tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    vhost, prefix = f"first-test-dev-{tag}", f"t{tag}-"
    env_file = tmp_path / "rabbit.env"
    try:
        envs = dev_rabbit_users(
            RABBIT_URL, "local", env_file, vhost=vhost, prefix=prefix, api_url=RABBIT_API
        )
        assert set(envs) == {"gateway", "router", "accounting", "site_agent", "producer"}
        urls = {service: env["FIRST_RABBIT_URL"] for service, env in envs.items()}
        assert len({amqp_user(url) for url in urls.values()}) == len(urls)
        assert envs["router"]["FIRST_ROUTER_SITE_USER_PREFIX"] == f"{prefix}site-"
        routers = json.loads(envs["site_agent"]["FIRST_SITE_AGENT_ROUTER_USERS"])
        assert routers == [f"{prefix}router"]
        assert env_file.stat().st_mode & 0o777 == 0o600
        # The topology is there, and the site's user reads its own queue.
        asyncio.run(read_site_queue(urls["site_agent"]))
    finally:
        with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
            for user in api.get("/users").raise_for_status().json():
                if user["name"].startswith(prefix):
                    api.delete(f"/users/{urllib.parse.quote(user['name'], safe='')}")
            api.delete(f"/vhosts/{urllib.parse.quote(vhost, safe='')}")
