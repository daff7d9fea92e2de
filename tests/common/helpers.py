"""Capturing log lines as the services write them (JSON, with the context ids)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

from services.common.logging import make_handler


class JsonLines:
    """The JSON lines written while `capture_json` is open, parsed."""

    def __init__(self, buffer: io.StringIO) -> None:
        self._buffer = buffer

    def text(self) -> str:
        return self._buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """Parse every line; fails the test if one is not a JSON object."""
        out = []
        for line in self.text().splitlines():
            parsed = json.loads(line)
            assert isinstance(parsed, dict), line
            out.append(parsed)
        return out


@contextlib.contextmanager
def capture_json(name: str = "services", level: int = logging.INFO) -> Iterator[JsonLines]:
    """Add a JSON handler (as configure_logging makes it) to logger `name` for the block."""
    buffer = io.StringIO()
    handler = make_handler(buffer, json_logs=True)
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield JsonLines(buffer)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
