"""Where file contents live: a small object-store-shaped interface and its directory version.

Only the bytes live here, under an opaque key (the file id); who owns a file and what it is
lives in SQL (services/gateway/batch_db.py). An S3-like store implements the same three calls.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


class FileStore(Protocol):
    """Put, get and delete whole objects by key."""

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...


class DirectoryStore:
    """Objects as files in one directory; a put is atomic (write aside, then rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not _KEY.match(key):  # keys are our own ids; this keeps any other out of the tree
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def _put(self, key: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        aside = path.with_suffix(".part")
        with aside.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        aside.replace(path)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        """Return the object's bytes; FileNotFoundError if there is none."""
        return await asyncio.to_thread(self._path(key).read_bytes)

    async def delete(self, key: str) -> None:
        """Remove the object (a missing one is already gone)."""
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)
