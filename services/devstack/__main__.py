"""`first dev`: the whole stack in the foreground, with a development API key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

from services.access import apikeys
from services.common.db import make_engine
from services.common.logging import configure_logging
from services.common.private_file import write_private
from services.common.rabbit_access import SetupError
from services.common.settings import CommonSettings
from services.devstack.procs import REPO, ProcessGroup, StartupError
from services.devstack.rabbit import dev_rabbit_users
from services.devstack.stack import (
    StackConfig,
    default_backends,
    key_files,
    redis_users,
    start_backends,
    start_services,
)

logger = logging.getLogger("first.dev")

DEV_USER = "dev"


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _previous_key(env_file: Path) -> str | None:
    if not env_file.exists():
        return None
    for line in env_file.read_text().splitlines():
        if line.startswith("FIRST_API_KEY="):
            return line.split("=", 1)[1].strip()
    return None


async def _dev_key(database_url: str, previous: str | None) -> str:
    """Reuse the key of the last run while it is valid; else issue a new admin key."""
    engine = make_engine(database_url)
    try:
        await apikeys.create_schema(engine)
        if previous and await apikeys.find_key(engine, apikeys.hash_key(previous)):
            return previous
        key, _ = await apikeys.create_key(engine, DEV_USER, admin=True)
        return key
    finally:
        await engine.dispose()


DEMO_GLOBUS_PORT = 8040
DEMO_CLIENT_ID = "00000000-0000-4000-8000-00000000f125"


def start_fake_globus(group: ProcessGroup, url: str, client_secret: str) -> None:
    """Run `first fake-globus` (Globus Auth + Groups on loopback) for the dev stack."""
    port = url.rsplit(":", 1)[1]
    argv = [sys.executable, "-c", "from services.cli import app; app()", "fake-globus"]
    argv += ["--client-id", DEMO_CLIENT_ID, "--client-secret", client_secret, "--port", port]
    group.wait_ready(group.start("fake-globus", argv, dict(os.environ), f"{url}/health"), 30)


def mint_demo_token(url: str) -> str:
    """Ask the stand-in for a demo user's access token (valid for 12 h)."""
    body = {"username": "demo@anl.gov", "expires_in": 12 * 3600}
    reply = httpx.post(f"{url}/fake/tokens", json=body, timeout=5, trust_env=False)
    token: str = reply.raise_for_status().json()["access_token"]
    return token


def main() -> None:
    """Start everything, print the base URL and key, and stop all of it on Ctrl-C."""
    common = CommonSettings()
    configure_logging(common.log_level, json_logs=False)
    state = REPO / ".first"
    database_url = os.environ.get(
        "FIRST_ACCOUNTING_DATABASE_URL", f"sqlite+aiosqlite:///{state / 'first.db'}"
    )
    # vLLM behind the relay with a key of its own, as a site runs it (the keys: 0600 files).
    backends = default_backends(state / "keys")
    globus_url = f"http://127.0.0.1:{DEMO_GLOBUS_PORT}"
    globus_secret = secrets.token_urlsafe(16)  # this run's stand-in client only
    config = StackConfig(
        rabbit_url=common.rabbit_url,
        redis_url=common.redis_url,
        database_url=database_url,
        backends={b.served_name: [b.url] for b in backends},
        backend_key_files=key_files(backends),
        files_dir=str(state / "files"),
        # Globus Auth as the services would use it, against the local stand-in.
        extra_env={
            "FIRST_ACCESS_GLOBUS_CLIENT_ID": DEMO_CLIENT_ID,
            "FIRST_ACCESS_GLOBUS_CLIENT_SECRET": globus_secret,
            "FIRST_ACCESS_GLOBUS_AUTH_URL": globus_url,
            "FIRST_ACCESS_GLOBUS_GROUPS_URL": globus_url,
        },
    )
    group = ProcessGroup(state / "logs")
    users = contextlib.ExitStack()  # each service's own Redis user, deleted when the stack stops
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        logger.info("starting vLLM-CPU backends (about 40 s); logs in %s", group.log_dir)
        start_backends(group, backends)
        start_fake_globus(group, globus_url, globus_secret)
        rabbit_env = state / "rabbit.env"
        config.service_env = dev_rabbit_users(common.rabbit_url, config.site_id, rabbit_env)
        config.redis_env = users.enter_context(
            redis_users(common.redis_url, config.site_id, "first-dev-")
        )
        start_services(group, config)
        token = mint_demo_token(globus_url)
        key = asyncio.run(_dev_key(database_url, _previous_key(state / "dev.env")))
        # An admin key: readable by its owner only (a login node has other users).
        write_private(state / "dev.env", f"FIRST_BASE_URL={config.base_url}\nFIRST_API_KEY={key}\n")
        print(f"\nFIRST is up.\n  FIRST_BASE_URL={config.base_url}\n  FIRST_API_KEY={key}")
        print(f"  a Globus access token (local stand-in, demo@anl.gov): {token}")
        print(
            f"  (also in {state / 'dev.env'}; logs in {group.log_dir}; Ctrl-C stops)\n", flush=True
        )
        while (dead := group.first_dead()) is None:
            time.sleep(0.5)
        logger.error(
            "%s exited (%s); stopping the stack\n%s", dead.name, dead.popen.returncode, dead.tail()
        )
        raise SystemExit(1)
    except _Stop:
        logger.info("stopping")
    except StartupError as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from exc
    except (SetupError, httpx.HTTPError, TimeoutError) as exc:
        logger.error("cannot set up the RabbitMQ users (is the management API up?): %s", exc)
        raise SystemExit(1) from exc
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        group.stop_all()
        users.close()


if __name__ == "__main__":
    main()
