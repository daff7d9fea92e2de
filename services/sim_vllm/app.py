"""The simulated vLLM's HTTP surface: OpenAI routes, /health, /version, /metrics, /sim/*.

Generation responses are ASGI responses that watch for the client to disconnect while they
work: when it goes, the work is cancelled at once, so the request leaves its slot and stops
generating, as vLLM aborts a request whose client went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import msgspec
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from services.sim_vllm import faults as faults_
from services.sim_vllm import parsing, shapes
from services.sim_vllm.engine import Engine, Job
from services.sim_vllm.faults import Injector
from services.sim_vllm.parsing import InvalidRequest, Kind, Plan
from services.sim_vllm.settings import Settings

logger = logging.getLogger(__name__)

JSON = "application/json"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
Work = Callable[[Send], Awaitable[None]]


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Watched(Response):
    """A response made by `work(send)`, cancelled as soon as the client disconnects.

    If the work returns without finishing the response, the server closes the connection.
    """

    def __init__(self, work: Work) -> None:
        super().__init__()
        self._work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.ensure_future(self._work(send))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            task.cancel()
            await asyncio.wait((task,))  # let the work leave its slot before we return
        if not task.cancelled():
            task.result()  # re-raise what the work raised


async def _send_json(send: Send, body: bytes, status: int = 200) -> None:
    headers = [(b"content-type", JSON.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _reached(limit: int | None, count: int) -> bool:
    return limit is not None and count >= limit


_HELP = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
}


class _Metrics(Collector):
    """vLLM's load series, read from the engine at each scrape."""

    def __init__(self, engine: Engine, model: str) -> None:
        self._engine = engine
        self._labels = [model, "0"]

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats()
        values = {
            "vllm:num_requests_running": stats.running,
            "vllm:num_requests_waiting": stats.waiting,
            "vllm:kv_cache_usage_perc": stats.kv_cache_usage,
            "vllm:prompt_tokens": stats.prompt_tokens,
            "vllm:generation_tokens": stats.generated_tokens,
        }
        for name, value in values.items():
            family = CounterMetricFamily if name.endswith("_tokens") else GaugeMetricFamily
            metric = family(name, _HELP[name], labels=["model_name", "engine"])
            metric.add_metric(self._labels, value)
            yield metric


class Simulator:
    """Turns requests into engine work and vLLM-shaped answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(
            slots=settings.slots,
            tokens_per_s=settings.tokens_per_s,
            ttft_s=settings.ttft_ms / 1000.0,
            max_model_len=settings.max_model_len,
        )
        self.injector = Injector(settings.faults(), settings.seed)
        self.registry = CollectorRegistry()
        self.registry.register(_Metrics(self.engine, settings.model))
        self.started = int(time.time())

    def refuse(self, status: int, message: str, param: str | None = None) -> Response:
        """Answer with vLLM's error shape and count the request as failed."""
        self.engine.counters.failed += 1
        return Response(shapes.error_body(status, message, param), status, media_type=JSON)

    def _admit(self) -> Response | None:
        """Count an inference request; return the injected failure it gets, if any."""
        self.engine.counters.received += 1
        number = self.injector.next_request_fails()
        if number is None:
            return None
        return self.refuse(500, f"Simulated failure of request {number}.")

    async def generate(self, request: Request, kind: Kind) -> Response:
        """Answer a chat or completions request, streamed or not."""
        if (failure := self._admit()) is not None:
            return failure
        try:
            plan = parsing.parse_generation(
                kind, await request.body(), self.settings.default_max_tokens
            )
            parsing.check_model(plan.model, self.settings.model)
            parsing.check_length(plan, self.settings.max_model_len)
        except InvalidRequest as exc:
            return self.refuse(exc.status, str(exc), exc.param)

        async def stream(send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            if await self._stream(send, plan, kind):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def respond(send: Send) -> None:
            job = Job(plan.prompt_tokens, plan.max_tokens, streamed=False)
            async with self.engine.admitted(job):
                await self.engine.run(job)
            make = shapes.chat_body if kind == "chat" else shapes.completion_body
            await _send_json(send, make(self.settings.model, plan.prompt_tokens, plan.max_tokens))

        return _Watched(stream if plan.stream else respond)

    async def _stream(self, send: Send, plan: Plan, kind: Kind) -> bool:
        """Send a stream's events; return False to have the connection closed abruptly."""
        faults = self.injector.faults
        writer = shapes.StreamWriter(
            kind, self.settings.model, plan.prompt_tokens, plan.max_tokens, plan.continuous_usage
        )

        async def event(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        job = Job(plan.prompt_tokens, plan.max_tokens)
        async with self.engine.admitted(job):
            while job.generated < job.max_tokens:
                if _reached(faults.close_after_tokens, job.generated):
                    logger.info("injected fault: closing a stream after %d tokens", job.generated)
                    return False
                if _reached(faults.stall_after_tokens, job.generated):
                    logger.info("injected fault: stalling a stream after %d tokens", job.generated)
                    await asyncio.sleep(self.settings.stall_limit_s)
                    return False
                number = await self.engine.next_token(job)
                if number == 1 and kind == "chat":
                    await event(writer.role())
                await event(writer.token(number))
            if plan.include_usage:
                await event(writer.usage())
            await event(shapes.DONE)
            job.finished = True
        return True

    async def embeddings(self, request: Request) -> Response:
        """Answer an embeddings request with deterministic unit vectors."""
        if (failure := self._admit()) is not None:
            return failure
        try:
            body, inputs = parsing.parse_embedding(await request.body())
            parsing.check_model(body.model, self.settings.model)
        except InvalidRequest as exc:
            return self.refuse(exc.status, str(exc), exc.param)
        tokens = sum(parsing.count_tokens(item) for item in inputs)

        async def respond(send: Send) -> None:
            job = Job(tokens, 0, streamed=False)
            async with self.engine.admitted(job):
                await self.engine.run(job)
            size = self.settings.embedding_dimensions
            vectors = [shapes.embed(item, size) for item in inputs]
            as_base64 = body.encoding_format == "base64"
            await _send_json(
                send, shapes.embeddings_body(self.settings.model, vectors, tokens, as_base64)
            )

        return _Watched(respond)

    async def set_faults(self, request: Request) -> Response:
        """Replace the faults with the JSON body's (`{}` clears them)."""
        try:
            new = faults_.decode(await request.body())
        except msgspec.MsgspecError as exc:
            body = shapes.error_body(400, f"Invalid faults: {exc}")
            return Response(body, 400, media_type=JSON)
        self.injector.replace(new)
        logger.info("faults replaced: %s", new)
        return Response(msgspec.json.encode(new), media_type=JSON)


def create_app(settings: Settings) -> FastAPI:
    """Build the simulator's app; nothing runs until it is served."""
    sim = Simulator(settings)
    app = FastAPI(title="sim-vllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = sim

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await sim.generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await sim.generate(request, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await sim.embeddings(request)

    @app.get("/v1/models")
    async def models() -> Response:
        body = shapes.models_body(settings.model, settings.max_model_len, sim.started)
        return Response(body, media_type=JSON)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if sim.injector.faults.unhealthy else 200)

    @app.get("/version")
    async def version() -> Response:
        return Response(msgspec.json.encode({"version": settings.version}), media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(sim.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sim/stats")
    async def stats() -> Response:
        return Response(msgspec.json.encode(sim.engine.stats()), media_type=JSON)

    @app.get("/sim/faults")
    async def get_faults() -> Response:
        return Response(msgspec.json.encode(sim.injector.faults), media_type=JSON)

    @app.post("/sim/faults")
    async def set_faults(request: Request) -> Response:
        return await sim.set_faults(request)

    return app
