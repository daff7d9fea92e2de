"""Structured logging: JSON when not a TTY, request/user/site ids from context."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)
user_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("user_id", default=None)
site_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("site_id", default=None)

_CONTEXT = (("request_id", request_id_var), ("user_id", user_id_var), ("site_id", site_id_var))


@contextlib.contextmanager
def fresh_context() -> Iterator[None]:
    """Clear the request/user/site ids for the block, then restore them.

    Each request a server handles gets its own task (and so its own ids); this makes it
    explicit where one caller runs many requests in one task (in-process test clients).
    """
    tokens = [(var, var.set(None)) for _, var in _CONTEXT]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, _ in _CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal, ids appended when present."""

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name}={getattr(record, name)}"
            for name, _ in _CONTEXT
            if getattr(record, name, None) is not None
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if ids:
            line = f"{line} [{ids}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def make_handler(stream: TextIO, *, json_logs: bool) -> logging.Handler:
    """Return a handler writing to `stream` (JSON or text) with the context ids on each record."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_logs else TextFormatter())
    handler.addFilter(_ContextFilter())
    return handler


def configure_logging(level: str = "INFO", json_logs: bool | None = None) -> None:
    """Send all logs to stderr, as JSON unless stderr is a terminal."""
    use_json = (not sys.stderr.isatty()) if json_logs is None else json_logs
    root = logging.getLogger()
    root.handlers[:] = [make_handler(sys.stderr, json_logs=use_json)]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log records too: one format per stream
    quiet_libraries()


LIBRARY_LOGGERS = (
    "aiormq",
    "aio_pika",
    "httpx",
    "httpcore",
    "uvicorn.access",
    "globus_sdk",
    "urllib3",
)
"""Transport libraries that log frames, headers or URLs at DEBUG: message bodies (prompts)
and credentials (an ingress message's header, a bearer token). Never below WARNING."""


def quiet_libraries() -> None:
    """Keep the transport libraries at WARNING whatever the service's own level."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
