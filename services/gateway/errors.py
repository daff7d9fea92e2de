"""The HTTP edge's error responses: OpenAI's shape for any refusal (services/access/errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from schemas.records import ErrorInfo


def error_body(info: ErrorInfo) -> dict[str, Any]:
    """Return OpenAI's error object for `info`."""
    return {
        "error": {
            "message": info.message,
            "type": info.type,
            "param": info.param,
            "code": info.code,
        }
    }


def error_response(info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    """Return `info` as an HTTP response with its status."""
    return JSONResponse(error_body(info), status_code=info.status, headers=headers)
