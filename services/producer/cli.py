"""`first queue publish FILE.jsonl`: publish a file of requests to `first.ingress`, collect results.

Input lines use OpenAI's batch format — `{"custom_id", "method": "POST", "url", "body"}` — and
are all checked before anything is published (a bad file publishes nothing). Output lines use
OpenAI's batch output format: `{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}`, in input order. Streaming is turned off: a result is one body.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from schemas.messages import Endpoint
from services.producer.client import Producer, ProducerError, Result

queue_app = typer.Typer(no_args_is_help=True)

ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class Line(msgspec.Struct, kw_only=True):
    custom_id: str
    method: str = "POST"
    url: str
    body: dict[str, Any]


class BadFile(ValueError):
    """The input file has a line that cannot be published (its number is in the message)."""


def read_lines(path: Path) -> list[Line]:
    """Parse and check every line; raise BadFile naming the first bad one."""
    lines: list[Line] = []
    seen: set[str] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = msgspec.json.decode(raw, type=Line)
            except msgspec.DecodeError as exc:
                raise BadFile(f"line {number}: {exc}") from None
            if line.method != "POST" or line.url not in ENDPOINTS:
                raise BadFile(f"line {number}: POST to one of {', '.join(ENDPOINTS)} only")
            if line.custom_id in seen:
                raise BadFile(f"line {number}: duplicate custom_id {line.custom_id!r}")
            seen.add(line.custom_id)
            line.body.pop("stream", None)
            line.body.pop("stream_options", None)
            lines.append(line)
    return lines


def output_line(line: Line, result: Result | None, failure: str | None) -> dict[str, Any]:
    """Return the OpenAI batch output line of one request."""
    if result is None or result.error is not None or failure is not None:
        error = result.error if result is not None else None
        return {
            "id": result.request_id if result else None,
            "custom_id": line.custom_id,
            "response": None,
            "error": {
                "code": (error.code if error else None) or "request_failed",
                "message": error.message if error else failure,
            },
        }
    return {
        "id": result.request_id,
        "custom_id": line.custom_id,
        "response": {
            "status_code": result.status,
            "request_id": result.request_id,
            "body": result.json(),
        },
        "error": None,
    }


async def publish_file(
    lines: list[Line],
    producer: Producer,
    *,
    in_flight: int,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Submit every line (at most `in_flight` unfinished at once); return the output lines."""
    gate = asyncio.Semaphore(in_flight)

    async def one(line: Line) -> dict[str, Any]:
        async with gate:
            try:
                request_id = await producer.submit(ENDPOINTS[line.url], line.body)
                return output_line(line, await producer.result(request_id, timeout_s), None)
            except (ProducerError, TimeoutError) as exc:
                return output_line(line, None, str(exc))

    return list(await asyncio.gather(*(one(line) for line in lines)))


@queue_app.command("publish")
def publish(
    file: Annotated[Path, typer.Argument(help="JSONL of requests in OpenAI's batch format.")],
    out: Annotated[Path | None, typer.Option(help="Write results here (default stdout).")] = None,
    rabbit_url: Annotated[
        str, typer.Option(envvar="FIRST_PRODUCER_RABBIT_URL", help="AMQP URL (producer user).")
    ] = "amqp://guest:guest@127.0.0.1:5672/",
    redis_url: Annotated[
        str, typer.Option(envvar="FIRST_PRODUCER_REDIS_URL", help="Redis URL (stream reader).")
    ] = "redis://127.0.0.1:6379/0",
    reply_queue: Annotated[
        str | None,
        typer.Option(help="Collect results from this reply queue of yours, not from Redis."),
    ] = None,
    in_flight: Annotated[int, typer.Option(help="Unfinished requests at once.")] = 256,
    timeout_s: Annotated[float, typer.Option(help="Bound per request's result.")] = 600.0,
) -> None:
    """Publish FILE's requests to first.ingress (credential: FIRST_API_KEY) and print results."""
    credential = os.environ.get("FIRST_API_KEY", "")
    if not credential:
        raise typer.BadParameter("set FIRST_API_KEY (an API key or a Globus access token)")
    try:
        lines = read_lines(file)
    except (BadFile, OSError) as exc:
        typer.echo(f"{file}: {exc}; nothing was published", err=True)
        raise typer.Exit(1) from None

    async def run() -> list[dict[str, Any]]:
        redis = None if reply_queue else redis_url
        async with Producer(
            rabbit_url, redis, credential, window=in_flight, reply_queue=reply_queue
        ) as producer:
            return await publish_file(lines, producer, in_flight=in_flight, timeout_s=timeout_s)

    results = asyncio.run(run())
    text = b"".join(msgspec.json.encode(r) + b"\n" for r in results)
    if out is None:
        sys.stdout.buffer.write(text)
    else:
        out.write_bytes(text)
    failed = sum(1 for r in results if r["error"] is not None)
    typer.echo(f"{len(results) - failed} completed, {failed} failed", err=True)
