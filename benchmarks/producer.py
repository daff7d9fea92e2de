#!/usr/bin/env python
"""Requests/s that one direct producer sustains end to end, against the same load over HTTP.

One run, one stack (the overhead benchmark's: `first sim-vllm` at 200 tok/s with a 20 ms
TTFT, accounting, router, site agent, gateway, a private redis-server and a fresh RabbitMQ
vhost), the same requests (non-streamed chat, `max_tokens` tokens each):

  producer   one `services.producer.client.Producer` publishes N requests to `first.ingress`
             (publisher confirms, at most W awaiting a confirm) and reads every result from
             its Redis stream, with at most W requests unfinished at once
  gateway    the same N requests over HTTP, W closed-loop httpx clients

Both report completed requests / wall time, and the CPU each process used.

    .venv/bin/python benchmarks/producer.py [--requests N] [--window W] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import overhead  # noqa: E402

from services.producer.client import Producer, ProducerError  # noqa: E402

RESULT_TIMEOUT_S = 60.0


def body(max_tokens: int, i: int) -> dict[str, Any]:
    return {
        "model": overhead.FAST,
        "messages": [{"role": "user", "content": f"benchmark {i}"}],
        "max_tokens": max_tokens,
    }


async def through_producer(
    stack: overhead.Stack, n: int, window: int, max_tokens: int
) -> tuple[float, int]:
    """Return (wall seconds, completed) for N requests through one producer."""
    gate = asyncio.Semaphore(window)
    completed = 0

    async with Producer(stack.rabbit_url, stack.redis.url, stack.api_key, window=window) as p:

        async def one(i: int) -> None:
            nonlocal completed
            async with gate:
                try:
                    request_id = await p.submit("chat.completions", body(max_tokens, i))
                    result = await p.result(request_id, RESULT_TIMEOUT_S)
                except (ProducerError, TimeoutError):
                    return
                if result.status == 200 and result.error is None:
                    completed += 1

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.monotonic() - started, completed


async def through_gateway(
    stack: overhead.Stack, n: int, window: int, max_tokens: int
) -> tuple[float, int]:
    """Return (wall seconds, completed) for N requests over HTTP with W concurrent clients."""
    client = overhead.Client({"authorization": f"Bearer {stack.api_key}"})
    url = f"{stack.gateway_url}/v1/chat/completions"
    todo = iter(range(n))
    completed = 0

    async def worker() -> None:
        nonlocal completed
        async with client.session() as http:
            for i in todo:
                reply = await client.post(http, url, body(max_tokens, i))
                completed += reply.ok

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(window)))
    for reason, count in client.tally.reasons.most_common(3):
        print(f"  gateway error x{count}: {reason}")
    return time.monotonic() - started, completed


async def run(n: int, window: int, max_tokens: int) -> dict[str, Any]:
    stack = overhead.Stack(Path(tempfile.mkdtemp(prefix="first-producer-bench-")))
    meter = overhead.CpuMeter()
    try:
        await stack.start()
        for name, proc in stack.procs.items():
            meter.pids[name] = proc.popen.pid
        if stack.redis.proc is not None:
            meter.pids["redis"] = stack.redis.proc.pid
        if stack.rabbit_pid is not None:
            meter.pids["rabbit"] = stack.rabbit_pid
        client = overhead.Client({"authorization": f"Bearer {stack.api_key}"})
        await overhead.wait_gateway(client, stack)
        await through_producer(stack, min(200, n), window, max_tokens)  # warm both paths
        await through_gateway(stack, min(200, n), window, max_tokens)
        out: dict[str, Any] = {"requests": n, "window": window, "max_tokens": max_tokens}
        for name, path in (("producer", through_producer), ("gateway", through_gateway)):
            await overhead.settle(meter)
            start = meter.snapshot()
            seconds, completed = await path(stack, n, window, max_tokens)
            cores = meter.cores(start, meter.snapshot())
            out[name] = {
                "seconds": round(seconds, 2),
                "completed": completed,
                "rps": round(completed / seconds, 1),
                "cores": {k: round(v, 2) for k, v in cores.items()},
            }
            print(f"{name}: {completed}/{n} in {seconds:.1f} s; {overhead.cpu_line(cores)}")
        return out
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = asyncio.run(run(args.requests, args.window, args.max_tokens))
    p, g = out["producer"], out["gateway"]
    print()
    print(f"| path | completed | req/s | (N={args.requests}, W={args.window}) |")
    print("|---|---|---|---|")
    print(f"| one producer → first.ingress | {p['completed']} | {p['rps']} | |")
    print(f"| HTTP gateway, {args.window} clients | {g['completed']} | {g['rps']} | |")
    print(f"| ratio producer / gateway | | {p['rps'] / max(g['rps'], 0.1):.2f} | |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
