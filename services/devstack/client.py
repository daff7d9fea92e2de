"""An SSE client that records what a user sees of each request (fault tests, benchmarks).

It speaks to any OpenAI-compatible server (the gateway or a backend directly) with one httpx
client, so both sides of a comparison are measured the same way.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Outcome:
    """What one client saw of one request."""

    request_id: str | None = None
    status: int | None = None
    content_chunks: int = 0
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    exception: str | None = None
    started: float = 0.0
    first_chunk_at: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    ended: float = 0.0

    @property
    def ttft(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started

    @property
    def inter_token(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error is None


def _content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text"):
            return True
    return False


async def stream(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> Outcome:
    """POST a streaming request and record every event until [DONE], an error or a drop."""
    out = Outcome(started=time.perf_counter())
    try:
        async with http.stream("POST", path, json=body, headers=headers) as response:
            out.status = response.status_code
            out.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                out.error = json.loads(await response.aread()).get("error")
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = chunk["error"]
                    continue
                if chunk.get("usage"):
                    out.usage = chunk["usage"]
                if _content(chunk):
                    now = time.perf_counter()
                    if out.first_chunk_at is None:
                        out.first_chunk_at = now
                    out.chunk_times.append(now)
                    out.content_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.ended = time.perf_counter()
    return out
