"""The agent's own instances, end to end: a site file, the local launcher, `first sim-vllm`.

Cold start (a request waits at the agent while its model starts, then is served), idle
unload, scale-up under a backlog, an instance killed with -9 (replaced, and said so in the
heartbeat), a StartModel from the control queue, and an agent restart that adopts the
instances it left running. Real RabbitMQ and Redis; real child processes, stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from schemas import names
from schemas.messages import ModelStatus, StartModel
from schemas.records import Failure, Final, Response
from services.common import topology
from services.common.broker import publish
from services.site_agent.app import create_app
from services.site_agent.settings import Settings
from tests.router.test_router import running_router, submit
from tests.site_agent.helpers import make_request, read_stream, send_to_site, unique, wait_for

SIM = [sys.executable, "-m", "services.sim_vllm", "--model", "{served_name}"]
SIM += ["--uds", "{uds}"]


def site_file(
    tmp_path: Path, site_id: str, model: str, launcher: str = "local", **limits: Any
) -> Path:
    sim_options = limits.pop("sim", [])
    config = {
        "site_id": site_id,
        "state_dir": str(tmp_path / "state"),
        "launcher": {"kind": launcher, "partition": "debug", "walltime": "00:10:00"}
        if launcher != "local"
        else {"kind": "local"},
        "models": {model: {"command": SIM + sim_options, "start_timeout_s": 30, **limits}},
    }
    path = tmp_path / "site.json.yaml"  # YAML is a superset of JSON
    path.write_text(json.dumps(config))
    return path


@asynccontextmanager
async def running_site(
    rabbit_url: str, redis_url: str, config: Path, *, stop_instances: bool = True
) -> AsyncIterator[FastAPI]:
    settings = Settings(
        rabbit_url=rabbit_url,
        redis_url=redis_url,
        config_file=config,
        heartbeat_interval_s=0.3,
        lifecycle_interval_s=0.2,
        cancel_poll_s=0.5,
        retry_delay_s=0.1,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        try:
            yield app
        finally:
            if stop_instances:
                await app.state.manager.stop_all()


def status(app: FastAPI, model: str) -> ModelStatus:
    beat = app.state.heartbeat.build(time.time())
    return next(m for m in beat.models if m.model == model)


def pids(app: FastAPI, model: str) -> list[int]:
    pool = app.state.backends.get(model)
    return [int(i.record.job_id) for i in pool.instances if i.record is not None]


async def serve_one(broker: RabbitBroker, redis: Any, site_id: str, model: str) -> list[Any]:
    request = make_request(
        model,
        body={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    await send_to_site(broker, site_id, request)
    return await read_stream(redis, request.request_id, within_s=40)


@dataclass
class World:
    """One test's RabbitMQ vhost, Redis, folder, and fresh site and model names."""

    rabbit_url: str
    redis_url: str
    broker: RabbitBroker
    redis: Redis
    tmp_path: Path
    site_id: str
    model: str

    def file(self, launcher: str = "local", **limits: Any) -> Path:
        return site_file(self.tmp_path, self.site_id, self.model, launcher, **limits)

    def site(self, config: Path, *, stop_instances: bool = True) -> Any:
        return running_site(self.rabbit_url, self.redis_url, config, stop_instances=stop_instances)

    async def serve_one(self) -> list[Any]:
        return await serve_one(self.broker, self.redis, self.site_id, self.model)


@pytest.fixture
def world(
    rabbit_url: str, redis_url: str, broker: RabbitBroker, redis_client: Redis, tmp_path: Path
) -> World:
    return World(
        rabbit_url, redis_url, broker, redis_client, tmp_path, unique("site"), unique("sim")
    )


async def test_a_request_for_a_cold_model_waits_for_its_start_then_the_model_unloads_when_idle(
    world: World,
) -> None:
    model = world.model
    config = world.file(idle_ttl_s=1.5, max_instances=1)
    async with world.site(config) as app:
        cold = status(app, model)
        assert (cold.state, cold.capacity, cold.slots_per_instance) == ("cold", 0, 8)
        assert pids(app, model) == []
        records = await world.serve_one()
        assert isinstance(records[0], Response)
        assert records[0].status == 200
        assert isinstance(records[-1], Final)
        assert records[-1].outcome == "completed"
        hot = status(app, model)
        assert (hot.state, hot.instances, hot.capacity) == ("hot", 1, 8)
        (pid,) = pids(app, model)
        await wait_for(lambda: status(app, model).state == "cold", within_s=15)
        await wait_for(lambda: not _running(pid), within_s=10)
        records_dir = world.tmp_path / "state" / "instances"
        await wait_for(lambda: not list(records_dir.glob("*.json")), within_s=10)


async def test_an_instance_killed_with_sigkill_is_replaced_and_the_heartbeat_says_so(
    world: World,
) -> None:
    model = world.model
    config = world.file(min_hot=1, max_instances=1)
    async with world.site(config) as app:
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        (first,) = pids(app, model)
        os.killpg(first, signal.SIGKILL)
        await wait_for(lambda: status(app, model).restarts == 1, within_s=15)
        assert "ended" in status(app, model).last_error
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        (second,) = pids(app, model)
        assert second != first
        records = await world.serve_one()
        assert isinstance(records[0], Response)


async def test_a_backlog_beyond_the_threshold_starts_a_second_instance(world: World) -> None:
    site_id, model = world.site_id, world.model
    config = world.file(
        min_hot=1, max_instances=2, max_concurrency=1, scale_up_waiting=1,
        sim=["--slots", "1", "--tokens-per-s", "20"],
    )  # fmt: skip
    async with world.site(config) as app:
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        requests = [
            make_request(
                model,
                body={
                    "model": model,
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 40,
                },
            )
            for _ in range(6)
        ]
        for request in requests:
            await send_to_site(world.broker, site_id, request)
        await wait_for(lambda: status(app, model).instances == 2, within_s=30)
        for request in requests:
            records = await read_stream(world.redis, request.request_id, within_s=60)
            assert isinstance(records[-1], Final)
            assert records[-1].outcome == "completed"


async def test_a_start_model_command_starts_an_instance_without_any_request(world: World) -> None:
    site_id, model = world.site_id, world.model
    config = world.file(idle_ttl_s=1.0)
    async with world.site(config) as app:
        command = StartModel(site_id=site_id, model=model, requested_at=time.time(), keep_s=4.0)
        await publish(
            world.broker,
            command,
            exchange=topology.CONTROL,
            routing_key=names.site_control_routing_key(site_id),
            timeout=5,
        )
        await wait_for(lambda: status(app, model).state in ("starting", "hot"), within_s=5)
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        await wait_for(lambda: status(app, model).state == "cold", within_s=15)  # keep_s, then idle


async def test_a_restarted_agent_adopts_the_instances_it_left_running(world: World) -> None:
    model = world.model
    config = world.file(min_hot=1, max_instances=1)
    async with world.site(config, stop_instances=False) as app:
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        (pid,) = pids(app, model)
    assert _running(pid)
    async with world.site(config) as app:
        await wait_for(lambda: status(app, model).state == "hot", within_s=15)
        assert pids(app, model) == [pid]
        assert status(app, model).restarts == 0
        records = await world.serve_one()
        assert isinstance(records[0], Response)
    await wait_for(lambda: not _running(pid), within_s=10)


async def test_an_instance_left_without_its_key_is_stopped_not_adopted(world: World) -> None:
    model = world.model
    config = world.file(min_hot=1, max_instances=1)
    async with world.site(config, stop_instances=False) as app:
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        (pid,) = pids(app, model)
    (key_file,) = (world.tmp_path / "state" / "keys").glob("*.key")
    key_file.unlink()  # as if started before instances had keys: nobody can use it
    async with world.site(config) as app:
        await wait_for(lambda: not _running(pid), within_s=15)
        await wait_for(lambda: status(app, model).state == "hot", within_s=30)
        assert pids(app, model) != [pid], "a new instance, with a key, took its place"


async def test_a_model_that_never_becomes_healthy_ends_its_waiting_request_with_model_starting(
    world: World,
) -> None:
    site_id, model = world.site_id, world.model
    broken = [sys.executable, "-c", "import time; time.sleep(60)"]  # listens nowhere
    config = world.file()
    data = json.loads(config.read_text())
    data["models"][model] |= {"command": broken, "start_timeout_s": 1.0}
    config.write_text(json.dumps(data))
    async with world.site(config) as app:
        app.state.settings  # noqa: B018 - the app is up
        request = make_request(model, expires_in=4.0)
        await send_to_site(world.broker, site_id, request)
        records = await read_stream(world.redis, request.request_id, within_s=20)
        assert isinstance(records[0], Failure)
        assert (records[0].error.status, records[0].error.code) == (503, "model_starting")
        assert "not healthy within 1 s" in records[0].error.message
        assert status(app, model).restarts >= 1


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, IndexError):
        return False


async def test_a_request_routed_while_no_site_has_its_model_hot_starts_it_and_is_served(
    world: World,
) -> None:
    """Through the router: no hot site -> StartModel to the site that may serve it, the request
    waits in that site's queue and agent (not in the router or gateway), then is served."""
    site_id, model = world.site_id, world.model
    config = world.file(idle_ttl_s=30)
    async with (
        running_router(world.rabbit_url, world.redis_url) as registry,
        world.site(config) as app,
    ):
        await wait_for(lambda: registry.get(site_id) is not None, within_s=5)
        assert status(app, model).state == "cold"
        request = make_request(model)
        await submit(world.broker, request)
        records = await read_stream(world.redis, request.request_id, within_s=40)
        assert isinstance(records[0], Response)
        assert records[0].status == 200
        assert isinstance(records[-1], Final)
        assert records[-1].site_id == site_id
        assert status(app, model).state == "hot"


async def test_through_slurm_a_cold_model_starts_as_a_job_serves_and_is_scancelled_when_idle(
    slurm_cluster: None, world: World
) -> None:
    """The real one-node Slurm cluster: sbatch on demand, the job reports where it listens,
    the request is served through it, and idle unload ends the job (scancel)."""
    model = world.model
    config = world.file(launcher="slurm", idle_ttl_s=2.0)
    async with world.site(config) as app:
        records = await world.serve_one()
        assert isinstance(records[0], Response)
        pool = app.state.backends.get(model)
        (instance,) = [i for i in pool.instances if i.record is not None]
        job_id = instance.record.job_id
        assert _job_state(job_id) == "RUNNING"
        await wait_for(lambda: status(app, model).state == "cold", within_s=20)
        await wait_for(lambda: _job_state(job_id) in ("", "CANCELLED", "COMPLETED"), within_s=30)


def _job_state(job_id: str) -> str:
    """Slurm's state of a job ("" once it left the controller's memory)."""
    done = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=10, check=False
    )
    for field in done.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""
