"""Fixtures of the site agent tests: a fake vLLM backend, a running agent, broker taps."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import names
from services.site_agent.settings import Settings
from tests.site_agent.fake_backend import FakeBackend
from tests.site_agent.helpers import Tap, agent_settings, running_agent, tap, unique

MODEL = unique("fake-model")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    server = FakeBackend(MODEL).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset_backend(backend: FakeBackend) -> None:
    backend.chunk_delay_s = 0.0
    backend.healthy = True
    backend.error_shape = "nested"


@pytest.fixture
async def agent(rabbit_url: str, redis_url: str, backend: FakeBackend) -> AsyncIterator[Settings]:
    settings = agent_settings(rabbit_url, redis_url, {MODEL: [backend.url]})
    async with running_agent(settings):
        yield settings


@pytest.fixture
async def usage(channel: Any) -> Tap:
    return await tap(channel, names.USAGE_EXCHANGE, "usage.#")


SLURM_SETUP_TIMEOUT_S = 300.0  # a first run installs the Debian packages


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Make sure the one-node Slurm cluster runs (`first_ensure_slurm` installs and starts it
    when it does not, as scripts/test does). No Slurm is a failure, not a skip."""
    done = subprocess.run(
        ["bash", "-c", ". scripts/lib/setup.sh; first_ensure_slurm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SLURM_SETUP_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"first_ensure_slurm failed:\n{done.stderr[-2000:]}")
    for tool in ("sbatch", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed")
