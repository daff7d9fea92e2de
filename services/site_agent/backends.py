"""The site's vLLM instances: a pool per model, their health and load from /health and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from schemas.messages import ModelState, ModelStatus
from services.site_agent.instance_keys import bearer
from services.site_agent.lifecycle import InstanceState, InstanceView, PoolView
from services.site_agent.siteconfig import ModelConfig

if TYPE_CHECKING:  # the launchers package imports this module (backend_session)
    from services.site_agent.launchers.base import InstanceRecord

logger = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # new name, old name
GENERATED = "vllm:generation_tokens_total"
_WANTED = frozenset((RUNNING, WAITING, GENERATED, *KV_CACHE))
KEEPALIVE_S = 4.0
"""How long an idle connection to vLLM stays pooled: less than the 5 s after which vLLM's
uvicorn closes it, so that a request does not go out on a connection the server is closing."""


def backend_session(limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """Return an HTTP session to vLLM instances; call it with the loop running (aiohttp's rule).

    `limit` bounds its open connections (0: none); `timeout` applies to calls that pass none.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=KEEPALIVE_S),
        # Stated although it is aiohttp's default: cluster nodes often set HTTP(S)_PROXY for
        # the outside world, and the vLLM instances are local, to be reached directly.
        trust_env=False,
        # The requests of all users share the session: nothing may carry over between them.
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=timeout,
    )


class SessionOwner:
    """Holds one aiohttp session from `async with` to its end (aiohttp binds a session to the
    running loop, so it cannot be made when the app is built)."""

    _http: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._http = self._open_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


@dataclass(frozen=True)
class Load:
    """One instance's load as its /metrics reported it for one model."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens: float = 0.0


def parse_metrics(text: str, model: str) -> Load:
    """Sum vLLM's series for `model` (label model_name; unlabelled samples count too).

    Raises ValueError on text that is not in Prometheus' exposition format.
    """
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _WANTED and sample.labels.get("model_name", model) == model:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return Load(
        running=int(sums.get(RUNNING, 0)),
        waiting=int(sums.get(WAITING, 0)),
        kv_cache_usage=max(sums.get(k, 0.0) for k in KV_CACHE),
        generated_tokens=sums.get(GENERATED, 0.0),
    )


@dataclass
class Instance:
    """One vLLM server. Health is unknown (assumed up) until the first probe.

    A configured URL is hot from the start; an instance our launcher started (`record` set)
    is "starting" until the instance manager finds it healthy, and "draining" before it stops.
    """

    url: str
    key: str = field(default="", repr=False)
    """The key it wants (`Authorization: Bearer`); "" for an instance that wants none."""
    healthy: bool = True
    in_flight: int = 0
    load: Load = field(default_factory=Load)
    foreign: int = 0
    """Requests the backend had at its last scrape beyond this agent's own (other clients)."""
    tokens_per_s: float = 0.0
    state: InstanceState = "hot"
    record: InstanceRecord | None = None
    alive: bool = True
    started_at: float = field(default_factory=time.monotonic)
    idle_since: float | None = field(default_factory=time.monotonic)
    _last_count: tuple[float, float] | None = None

    @property
    def instance_id(self) -> str:
        return self.record.instance_id if self.record is not None else self.url

    @property
    def managed(self) -> bool:
        return self.record is not None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count one request in flight on this instance while the block runs."""
        self.in_flight += 1
        self.idle_since = None
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle_since = time.monotonic()

    def occupancy(self, slots: int) -> tuple[int, int]:
        """Return (running, waiting) now: this agent's requests in flight (exact, live) plus the
        other clients' from the last scrape. The scraped figures alone are up to a probe
        interval old — longer than a short request — and a router dispatching batch work on a
        stale "running" overcommits the site (or leaves slots idle)."""
        busy = self.in_flight + self.foreign
        running = min(busy, slots)
        return running, busy - running

    def view(self) -> InstanceView:
        """Return what the lifecycle decisions need to know of this instance."""
        busy = self.in_flight > 0 or self.load.running > 0 or self.load.waiting > 0
        return InstanceView(
            instance_id=self.instance_id,
            state=self.state,
            managed=self.managed,
            healthy=self.healthy,
            alive=self.alive,
            in_flight=self.in_flight,
            running=self.load.running,
            waiting=self.load.waiting,
            started_at=self.started_at,
            idle_since=None if busy else self.idle_since,
        )

    def mark_down(self) -> None:
        """Take the instance out of rotation until a probe finds it healthy again."""
        self.healthy = False

    def count_tokens(self, now: float, total: float) -> None:
        """Update the generation rate from vLLM's token counter."""
        if self._last_count is not None and now > self._last_count[0]:
            delta = max(0.0, total - self._last_count[1])
            self.tokens_per_s = delta / (now - self._last_count[0])
        self._last_count = (now, total)


class Pool:
    """The instances serving one model, and the demand on it.

    `config` is None for a model given only by URLs in the environment (nothing to start).
    """

    def __init__(
        self, model: str, urls: Sequence[str], config: ModelConfig | None = None, key: str = ""
    ) -> None:
        self.model = model
        self.config = config
        self.instances = [Instance(url.rstrip("/"), key) for url in urls]
        self.held = 0
        self.wanted_until = 0.0
        self.failures = 0
        self.last_failure_at = 0.0
        self.restarts = 0
        self.last_error = ""
        self._changed = asyncio.Event()
        self.demand = asyncio.Event()
        """Set when a request starts waiting: wakes the instance manager at once."""

    def _serving(self) -> list[Instance]:
        return [i for i in self.instances if i.state == "hot"]

    def candidates(self) -> list[Instance]:
        """Return hot instances to try in order: healthy least-loaded first, then the rest."""
        order = sorted(
            enumerate(self._serving()),
            key=lambda p: (not p[1].healthy, p[1].in_flight, p[1].load.running, p[0]),
        )
        return [instance for _, instance in order]

    def ready(self) -> bool:
        """Tell whether a hot, healthy instance can take a request now."""
        return any(i.healthy for i in self._serving())

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait (counted as held demand) until `ready()`, at most `timeout_s`; say if it is."""
        deadline = time.monotonic() + timeout_s
        self.held += 1
        self.demand.set()
        try:
            while not self.ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            return True
        finally:
            self.held -= 1

    def changed(self) -> None:
        """Wake requests waiting for this pool (an instance became hot, or left)."""
        self._changed.set()

    def find(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)

    def view(self) -> PoolView:
        return PoolView(
            model=self.model,
            instances=tuple(i.view() for i in self.instances),
            held=self.held,
            wanted_until=self.wanted_until,
            failures=self.failures,
            last_failure_at=self.last_failure_at,
        )

    def status(self, per_instance: int) -> ModelStatus:
        """Summarise the pool for a heartbeat.

        hot: a healthy hot instance serves; starting: one is on its way (or demand waits for
        one); draining: only draining ones are left; cold: none. Capacity counts healthy hot
        instances; `slots_per_instance` tells a router what starting one would add.
        """
        slots = self.config.max_concurrency if self.config is not None else per_instance
        up = [i for i in self._serving() if i.healthy]
        if up:
            state: ModelState = "hot"
        elif any(i.state == "starting" for i in self.instances) or self.held > 0:
            state = "starting"
        elif any(i.state == "draining" for i in self.instances):
            state = "draining"
        else:
            state = "cold"
        return ModelStatus(
            model=self.model,
            state=state,
            instances=len(up),
            running=sum(i.occupancy(slots)[0] for i in up),
            waiting=sum(i.occupancy(slots)[1] for i in up) + self.held,
            capacity=len(up) * slots,
            kv_cache_usage=max((i.load.kv_cache_usage for i in up), default=0.0),
            tokens_per_s=round(sum(i.tokens_per_s for i in up), 3),
            slots_per_instance=slots,
            max_instances=self.config.max_instances if self.config is not None else 0,
            restarts=self.restarts,
            last_error=self.last_error,
        )

    async def probe(self, http: aiohttp.ClientSession, limit_s: float) -> None:
        """Refresh every instance's health and load; each GET is bounded by `limit_s`."""
        timeout = aiohttp.ClientTimeout(total=limit_s)
        # A starting instance is probed by the instance manager (health and /v1/models), not
        # here; one without a URL yet has not reported where it listens.
        probed = [i for i in self.instances if i.url and i.state != "starting"]
        await asyncio.gather(*(self._probe_one(http, i, timeout) for i in probed))

    async def _probe_one(
        self, http: aiohttp.ClientSession, instance: Instance, timeout: aiohttp.ClientTimeout
    ) -> None:
        headers = bearer(instance.key)
        try:
            async with http.get(
                f"{instance.url}/health", headers=headers, timeout=timeout
            ) as health:
                healthy = health.status == 200
                await health.read()  # to its end, so that the connection is reused
            async with http.get(
                f"{instance.url}/metrics", headers=headers, timeout=timeout
            ) as metrics:
                metrics_status = metrics.status
                text = (await metrics.read()).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if instance.healthy:
                logger.warning("instance %s of %s is down: %r", instance.url, self.model, exc)
            instance.healthy = False
            return
        if healthy != instance.healthy:
            logger.info("instance %s of %s healthy=%s", instance.url, self.model, healthy)
        instance.healthy = healthy
        if metrics_status == 200:
            try:
                instance.load = parse_metrics(text, self.model)
                scraped = instance.load.running + instance.load.waiting
                instance.foreign = max(0, scraped - instance.in_flight)
            except ValueError as exc:
                logger.warning("unreadable /metrics from %s: %s", instance.url, exc)
                return
            instance.count_tokens(time.monotonic(), instance.load.generated_tokens)


class Backends:
    """Every model's pool on this site: URLs from the environment and the site file's models.

    Per model, `env_keys` holds the key the environment's URLs want
    (FIRST_SITE_AGENT_BACKEND_KEY_FILES) and `site_keys` the key of the site file's `urls`
    (its `api_key_file`); a model without one sends no key.
    """

    def __init__(
        self,
        config: Mapping[str, Sequence[str]],
        models: Mapping[str, ModelConfig] | None = None,
        env_keys: Mapping[str, str] | None = None,
        site_keys: Mapping[str, str] | None = None,
    ) -> None:
        env_keys = env_keys or {}
        site_keys = site_keys or {}
        self.pools = {
            model: Pool(model, urls, key=env_keys.get(model, "")) for model, urls in config.items()
        }
        for model, model_config in (models or {}).items():
            urls = [*self.pools.pop(model).instances] if model in self.pools else []
            pool = Pool(model, model_config.urls, model_config, site_keys.get(model, ""))
            pool.instances.extend(urls)
            self.pools[model] = pool

    def get(self, model: str) -> Pool | None:
        """Return the pool of `model`, None if this site does not serve it."""
        return self.pools.get(model)

    async def probe(self, http: aiohttp.ClientSession, limit_s: float) -> None:
        """Refresh every pool."""
        await asyncio.gather(*(pool.probe(http, limit_s) for pool in self.pools.values()))

    def statuses(self, per_instance: int) -> tuple[ModelStatus, ...]:
        """Return every model's status, by model name."""
        return tuple(self.pools[m].status(per_instance) for m in sorted(self.pools))
