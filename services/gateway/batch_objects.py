"""OpenAI's file, batch and batch-output-line objects, built from rows (pure)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from schemas.records import ErrorInfo, Reply
from services.common.ids import new_request_id
from services.gateway.batch_db import STEP_TIMES, BatchRow, FileRow, LineRow
from services.gateway.errors import error_body

STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
ENDED = ("failed", "completed", "expired", "cancelled")
"""Statuses a batch never leaves."""

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def new_file_id() -> str:
    return f"file-{new_request_id()}"


def new_batch_id() -> str:
    return f"batch_{new_request_id()}"


def result_file_id(batch_id: str, kind: str) -> str:
    """Return the id of a batch's output or error file: the same on every (re)finalization."""
    return f"file-{batch_id.removeprefix('batch_')}-{kind}"


def file_object(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.file_id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def batch_object(row: BatchRow, counts: dict[str, int]) -> dict[str, Any]:
    """Return the batch as OpenAI's `Batch` (request_counts from `batch_db.line_counts`)."""
    return {
        "id": row.batch_id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": None if row.errors is None else _decode.decode(row.errors),
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": int(row.created_at),
        **{name: _ts(getattr(row, name)) for name in ("expires_at", *STEP_TIMES)},
        "request_counts": {
            "total": row.total,
            "completed": counts.get("completed", 0),
            "failed": counts.get("failed", 0),
        },
        "metadata": None if row.metadata is None else _decode.decode(row.metadata),
    }


def validation_errors(code: str, message: str) -> str:
    """Return a failed batch's `errors` (OpenAI's list of `{code, message, param, line}`)."""
    item = {"code": code, "message": message, "param": None, "line": None}
    return _json.encode({"object": "list", "data": [item]}).decode()


def result_of(reply: Reply) -> tuple[int, bytes]:
    """Return a line's HTTP status and response body from its Reply."""
    if reply.body and reply.status:
        return reply.status, reply.body
    error = reply.error or ErrorInfo(
        status=502,
        message="The backend ended the request without a response.",
        type="server_error",
        code="empty_response",
    )
    return error.status, _json.encode(error_body(error))


def _line_id(batch_id: str, line: LineRow) -> str:
    if line.request_id:
        return f"batch_req_{line.request_id}"
    digest = hashlib.sha256(f"{batch_id}:{line.line_no}".encode()).hexdigest()[:32]
    return f"batch_req_{digest}"


def output_line(batch_id: str, line: LineRow) -> tuple[bool, bytes]:
    """Return (goes to the output file?, the JSONL line) for an ended line."""
    item: dict[str, Any] = {"id": _line_id(batch_id, line), "custom_id": line.custom_id}
    if line.status_code is None:
        message = line.error_message or "The request did not run."
        item |= {"response": None, "error": {"code": line.error_code, "message": message}}
        return False, _json.encode(item)
    item["response"] = {
        "status_code": line.status_code,
        "request_id": line.request_id,
        "body": _decode.decode(line.response) if line.response else None,
    }
    item["error"] = None
    return 200 <= line.status_code < 300, _json.encode(item)


def result_files(batch_id: str, lines: list[LineRow]) -> tuple[bytes, bytes]:
    """Return the output and error files' contents (JSONL, in input order)."""
    out: list[bytes] = []
    err: list[bytes] = []
    for line in lines:
        ok, text = output_line(batch_id, line)
        (out if ok else err).append(text + b"\n")
    return b"".join(out), b"".join(err)
