"""The instance manager: carries out the lifecycle decisions through the site's launcher.

Every tick (and at once when a request starts waiting for a cold model) it refreshes what it
cannot learn from the heartbeat's probes — where a starting instance listens and whether it is
healthy yet, whether an unhealthy instance's process or job still exists — then asks
`lifecycle.plan` what to do per model and does it. Launcher calls are bounded by the launcher
(`submit_timeout_s`); a failed start is counted, logged and shown in the heartbeat.

Instances outlive the agent: on start it adopts what the launcher recovers (they become hot
once healthy), and on a normal stop it leaves them running for the next agent, unless
`stop_all` is called. Each instance's key (launchers/base.py) is read back from the state
folder, so an adopted instance is probed and used like one this agent started; one whose key
is gone (started before instances had keys, or its file removed) cannot be used and is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time

from schemas.messages import StartModel, StopModel
from services.site_agent import lifecycle
from services.site_agent.backends import Backends, Instance, Pool
from services.site_agent.launchers.base import InstanceSpec, Launcher, LaunchError
from services.site_agent.launchers.health import probe_instance
from services.site_agent.lifecycle import Drain, Promote, Start, Stop

logger = logging.getLogger(__name__)


def new_instance_id(model: str) -> str:
    """Return a unique, scheduler- and file-name-safe id for an instance of `model`."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower()[:32] or "model"
    return f"{slug}-{secrets.token_hex(4)}"


class InstanceManager:
    """Starts, promotes, drains and stops the instances of every configured model."""

    def __init__(
        self,
        backends: Backends,
        launcher: Launcher,
        *,
        interval_s: float = 1.0,
        probe_timeout_s: float = 2.0,
    ) -> None:
        self._backends = backends
        self._launcher = launcher
        self._interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._closed = False

    def _managed_pools(self) -> list[Pool]:
        return [p for p in self._backends.pools.values() if p.config is not None]

    async def recover(self) -> int:
        """Adopt the instances a previous agent left running; return how many."""
        adopted = 0
        for record in await self._launcher.recover():
            pool = self._backends.get(record.model)
            if pool is None or pool.config is None:
                logger.warning(
                    "stopping %s: model %s is no longer configured",
                    record.instance_id,
                    record.model,
                )
                await self._launcher.stop(record)
                continue
            try:
                key = self._launcher.key(record)
            except LaunchError as exc:
                logger.warning("stopping %s: %s", record.instance_id, exc)
                await self._launcher.stop(record)
                continue
            pool.instances.append(
                Instance(record.url, key, healthy=False, state="starting", record=record)
            )
            adopted += 1
            logger.info(
                "adopted instance %s of %s (%s)",
                record.instance_id,
                record.model,
                record.url or "no url yet",
            )
        return adopted

    def control(self, command: StartModel | StopModel) -> None:
        """Apply a router's command to the pool it names (unknown models are logged)."""
        pool = self._backends.get(command.model)
        if pool is None or pool.config is None:
            logger.warning(
                "%s for %s ignored: not a model this site starts",
                type(command).__name__,
                command.model,
            )
            return
        if isinstance(command, StartModel):
            pool.wanted_until = max(pool.wanted_until, time.monotonic() + command.keep_s)
            pool.demand.set()
        else:
            pool.wanted_until = 0.0
            for instance in pool.instances:
                if instance.managed and instance.state != "draining":
                    instance.state = "draining"
            pool.changed()

    async def _refresh(self, pool: Pool) -> None:
        """Learn where starting instances listen and if they are up; check unhealthy ones."""
        for instance in pool.instances:
            if instance.record is None:
                continue
            if instance.state == "starting":
                if not instance.url:
                    instance.url = (await self._launcher.locate(instance.record)).rstrip("/")
                    instance.record.url = instance.url
                if instance.url:
                    instance.healthy = await probe_instance(
                        instance.url, pool.model, self._probe_timeout_s, key=instance.key
                    )
            if not instance.healthy:
                try:
                    instance.alive = await self._launcher.alive(instance.record)
                except LaunchError as exc:  # the scheduler did not answer: unknown, not dead
                    logger.warning("cannot tell if %s is alive: %s", instance.instance_id, exc)

    async def _act(self, pool: Pool, action: lifecycle.Action) -> None:
        if isinstance(action, Start):
            await self._start(pool, action.reason)
            return
        instance = pool.find(action.instance_id)
        if instance is None:
            return
        if isinstance(action, Promote):
            instance.state = "hot"
            instance.idle_since = time.monotonic()  # idle from now, not from its submission
            pool.failures = 0
            logger.info(
                "instance %s of %s is hot at %s", instance.instance_id, pool.model, instance.url
            )
            pool.changed()
        elif isinstance(action, Drain):
            instance.state = "draining"
            logger.info("draining %s of %s: %s", instance.instance_id, pool.model, action.reason)
        elif isinstance(action, Stop):
            await self._stop(pool, instance, action)

    async def _start(self, pool: Pool, reason: str) -> None:
        assert pool.config is not None  # only configured pools are planned
        spec = InstanceSpec(
            instance_id=new_instance_id(pool.model),
            model=pool.model,
            command=pool.config.command,
            env=pool.config.env,
            resources=pool.config.resources,
        )
        logger.info("starting %s for %s: %s", spec.instance_id, pool.model, reason)
        try:
            record = await self._launcher.start(spec)
        except LaunchError as exc:
            self._failed(pool, f"start failed: {exc}")
            return
        if self._closed:  # stop_all ran while this start was on its way
            await self._launcher.stop(record)
            return
        try:
            key = self._launcher.key(record)
        except LaunchError as exc:
            self._failed(pool, f"start failed: {exc}")
            await self._launcher.stop(record)
            return
        pool.instances.append(
            Instance(record.url, key, healthy=False, state="starting", record=record)
        )

    async def _stop(self, pool: Pool, instance: Instance, action: Stop) -> None:
        if action.failed:
            self._failed(pool, f"instance {instance.instance_id}: {action.reason}")
            pool.restarts += 1
        else:
            logger.info("stopping %s of %s: %s", instance.instance_id, pool.model, action.reason)
        if instance in pool.instances:
            pool.instances.remove(instance)
        pool.changed()
        if instance.record is not None:
            try:
                await self._launcher.stop(instance.record)
            except LaunchError as exc:
                logger.warning("could not stop %s: %s", instance.instance_id, exc)

    def _failed(self, pool: Pool, error: str) -> None:
        logger.warning("%s: %s", pool.model, error)
        pool.failures += 1
        pool.last_failure_at = time.monotonic()
        pool.last_error = error

    async def tick(self) -> None:
        """Refresh, plan and act once for every configured model."""
        for pool in self._managed_pools():
            if self._closed:
                return
            assert pool.config is not None
            await self._refresh(pool)
            for action in lifecycle.plan(pool.view(), pool.config, time.monotonic()):
                await self._act(pool, action)

    async def run(self) -> None:
        """Tick every interval, or at once when a request starts waiting; until cancelled."""
        while True:
            try:
                await self.tick()
            except (LaunchError, OSError) as exc:
                logger.warning("instance manager tick failed: %r", exc)
            waits = [asyncio.ensure_future(p.demand.wait()) for p in self._managed_pools()]
            try:
                if waits:
                    await asyncio.wait(waits, timeout=self._interval_s)
                else:
                    await asyncio.sleep(self._interval_s)
            finally:
                for wait in waits:
                    wait.cancel()
                for pool in self._managed_pools():
                    pool.demand.clear()

    async def stop_all(self, timeout_s: float = 30.0) -> None:
        """Stop every instance this site started (bounded) and start no more; used when a
        site is taken down."""
        self._closed = True
        for pool in self._managed_pools():
            for instance in list(pool.instances):
                if instance.record is None:
                    continue
                with contextlib.suppress(LaunchError, TimeoutError):
                    await asyncio.wait_for(self._launcher.stop(instance.record), timeout_s)
                if instance in pool.instances:
                    pool.instances.remove(instance)
            pool.changed()
