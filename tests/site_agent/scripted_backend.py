"""A loopback HTTP/1.1 server that answers every request with a scripted chunked body.

A test seam below the fake vLLM: each part of the script goes out in one socket write, so a
test decides which events arrive together; `None` in the script means "send nothing more,
keep the connection open". It records how many connections it accepted and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class ScriptedBackend:
    """Serves `parts` (pausing `pause_s` between them) to every POST, on 127.0.0.1."""

    def __init__(self, parts: Sequence[bytes | None], pause_s: float = 0.1) -> None:
        self.parts = parts
        self.pause_s = pause_s
        self.accepted = 0
        self.closed = asyncio.Event()
        """Set when a client closes its connection while its response is unfinished."""
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> ScriptedBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while await self._answer(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; return False when the client has gone."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        self.requests += 1
        writer.write(HEAD)
        for i, part in enumerate(self.parts):
            if part is None:  # stall: wait for the client to hang up
                await reader.read()
                self.closed.set()
                return False
            if i:
                await asyncio.sleep(self.pause_s)
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
