"""The local Globus stand-in (`first fake-globus`) for the gateway's tests: run it, mint tokens."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.devstack.procs import ProcessGroup
from tests.faults.privates import free_port

CLIENT_ID = "0b8a1f3e-6a4e-4c1e-9d55-1d2c3e4f5a6b"
SECRET = "s3cret-for-tests"
MEMBERS = "11111111-2222-3333-4444-555555555555"
CACHE_TTL_S = 1.0


def run_fake_globus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run the stand-in on a free loopback port until the generator is closed."""
    group = ProcessGroup(tmp_path_factory.mktemp("fake-globus"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-c", "from services.cli import app; app()", "fake-globus"]
    argv += ["--client-id", CLIENT_ID, "--client-secret", SECRET, "--port", str(port)]
    proc = group.start("fake-globus", argv, {}, f"{url}/health")
    try:
        group.wait_ready(proc, 30)
        yield url
    finally:
        group.stop_all()


def mint(globus_url: str, username: str, **spec: Any) -> str:
    body = {"username": username, **spec}
    reply = httpx.post(f"{globus_url}/fake/tokens", json=body, timeout=5, trust_env=False)
    token: str = reply.raise_for_status().json()["access_token"]
    return token


def revoke(globus_url: str, token: str) -> None:
    body = {"token": token}
    reply = httpx.post(f"{globus_url}/fake/revoke", json=body, timeout=5, trust_env=False)
    assert reply.raise_for_status().json()["revoked"] is True


def introspections(globus_url: str) -> int:
    reply = httpx.get(f"{globus_url}/fake/stats", timeout=5, trust_env=False)
    count: int = reply.raise_for_status().json()["introspections"]
    return count
