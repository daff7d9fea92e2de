"""A tiny OpenAI-compatible server shaped like vLLM's: a test seam for the site agent only.

It answers /v1/chat/completions, /v1/completions, /v1/embeddings with fixed bodies, streams
one chunk per word plus (when asked) vLLM's usage-only chunk, and serves /health and /metrics
with `vllm:*` series. A request with a negative `max_tokens` gets vLLM's 400 error.
Runs uvicorn in a thread on a free loopback port.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

WORDS = ("Hello", " from", " the", " fake", " backend", ".")
PROMPT_TOKENS = 7
EMBEDDING = [0.25, -0.5, 0.125]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeBackend:
    """One fake vLLM instance serving `model`; knobs are plain attributes."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.hits: collections.Counter[str] = collections.Counter()
        self.bodies: list[dict[str, Any]] = []
        self.healthy = True
        self.chunk_delay_s = 0.0
        self.waiting = 0
        self.error_shape: Literal["nested", "flat"] = "nested"
        self.streams_started = 0
        self.streams_aborted = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._build()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._running = 0

    # -- responses ---------------------------------------------------------------------------
    def _error(self, message: str, param: str) -> JSONResponse:
        error = {"message": message, "type": "BadRequestError", "param": param, "code": 400}
        if self.error_shape == "flat":
            return JSONResponse({"object": "error", **error}, status_code=400)
        return JSONResponse({"error": error}, status_code=400)

    def _usage(self, completion: int) -> dict[str, int]:
        total = PROMPT_TOKENS + completion
        return {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": total,
        }

    def _chunk(self, kind: str, piece: str | None, finish: str | None = None) -> dict[str, Any]:
        if kind == "chat":
            delta = {} if piece is None else {"content": piece}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": "fake-1",
            "object": obj,
            "created": 1,
            "model": self.model,
            "choices": [choice],
        }

    async def _events(self, kind: str, include_usage: bool) -> AsyncIterator[bytes]:
        import json

        self.streams_started += 1
        self._running += 1
        finished = False
        try:
            for word in WORDS:
                yield f"data: {json.dumps(self._chunk(kind, word))}\n\n".encode()
                await asyncio.sleep(self.chunk_delay_s)
            yield f"data: {json.dumps(self._chunk(kind, None, 'stop'))}\n\n".encode()
            if include_usage:
                last = {
                    "id": "fake-1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage(len(WORDS)),
                }
                yield f"data: {json.dumps(last)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self._running -= 1
            if not finished:
                self.streams_aborted += 1

    async def _generate(self, request: Request, kind: str) -> Any:
        body = await request.json()
        self.hits[kind] += 1
        self.bodies.append(body)
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] < 0:
            return self._error(
                f"max_tokens must be at least 1, got {body['max_tokens']}.", "max_tokens"
            )
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(kind, include), media_type="text/event-stream")
        text = "".join(WORDS)
        if kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
        return {
            "id": "fake-1",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": 1,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(len(WORDS)),
        }

    def _metrics(self) -> str:
        labels = f'engine="0",model_name="{self.model}"'
        return (
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{{{labels}}} {float(self._running)}\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{{{labels}}} {float(self.waiting)}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.125\n"
        )

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self._generate(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self._generate(request, "completions")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Any:
            body = await request.json()
            self.hits["embeddings"] += 1
            self.bodies.append(body)
            return {
                "object": "list",
                "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": EMBEDDING}],
                "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
            }

        @app.get("/health")
        async def health() -> PlainTextResponse:
            return PlainTextResponse("", status_code=200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self._metrics())

        return app

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeBackend:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            loop="asyncio",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake backend did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
