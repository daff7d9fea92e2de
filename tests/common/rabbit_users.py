"""Least-privilege RabbitMQ users for a test stack, made by the operator's own command.

`first rabbit setup` runs as a subprocess (as an operator runs it) with the vhost's admin URL;
its env file is parsed back per component. RabbitMQ users are global, not per vhost: each
stack gets a unique user-name prefix, and the users are deleted when the block ends.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
from aio_pika.abc import AbstractChannel

from tests.conftest import RABBIT_API, _rabbit_auth

SERVICE_OF_ROLE = {"gateway": "gateway", "router": "router", "accounting": "accounting"}


@dataclass
class Users:
    """The env each service runs with (by service name), and every user's AMQP URL."""

    prefix: str
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    """By label: "gateway", "router", "accounting", "site <id>", "producer <name>"."""


def parse_env_file(text: str, prefix: str) -> Users:
    """Read `first rabbit setup`'s output: `# <label>: user <name>` then NAME=value lines."""
    users = Users(prefix)
    label = ""
    for line in text.splitlines():
        if line.startswith("# ") and ": user " in line:
            label, user = line[2:].split(": user ", 1)
            if label.startswith("producer") and "producer-" in user:  # one label per producer
                label = f"producer {user.split('producer-', 1)[1]}"
            continue
        if not line or line.startswith("#"):
            continue
        name, value = line.split("=", 1)
        role = label.split(" ", 1)[0]
        service = "site_agent" if role == "site" else SERVICE_OF_ROLE.get(role, role)
        users.service_env.setdefault(service, {})[name] = value
        if name == "FIRST_RABBIT_URL":
            users.urls[label] = value
    return users


@contextlib.contextmanager
def least_privilege_users(
    admin_url: str, sites: list[str], workdir: Path, producers: tuple[str, ...] = ()
) -> Iterator[Users]:
    """Run `first rabbit setup` for the vhost of `admin_url`; delete its users afterwards."""
    prefix = f"t{secrets.token_hex(3)}-"
    out = workdir / f"{prefix}rabbit.env"
    argv = [sys.executable, "-c", "from services.cli import app; app()", "rabbit", "setup"]
    argv += ["--admin-url", admin_url, "--prefix", prefix, "--out", str(out)]
    argv += ["--api-url", RABBIT_API]
    for site in sites:
        argv += ["--site", site]
    for producer in producers:
        argv += ["--producer", producer]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    users = parse_env_file(out.read_text(), prefix)
    try:
        yield users
    finally:
        with httpx.Client(base_url=RABBIT_API, auth=_rabbit_auth(), timeout=10) as api:
            for url in users.urls.values():
                user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "")
                api.delete(f"/users/{urllib.parse.quote(user, safe='')}")


Operation = Callable[[AbstractChannel], Awaitable[object]]
"""Something a user tries on a channel of its own (a publish, a bind, a consume)."""


async def attempt(url: str, operation: Operation) -> None:
    """Run `operation` on a fresh connection as the user of `url` (raises what it raises)."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await operation(channel)
    finally:
        await connection.close()
