"""Errors of the site agent. They cross to the client as data (Failure records).

Exception
 └── AgentError
      └── InvalidBody            the RunInference body is not a JSON object

ErrorInfo written as Failure + Final(outcome="failed"):
 ├── <vLLM's status> <vLLM's type>           vLLM refused the request (its message, param)
 ├── 400 invalid_request_error / invalid_body
 ├── 502 server_error / backend_unavailable   no instance of the model accepted a connection
 ├── 502 server_error / backend_error         an instance broke off or garbled its answer
 ├── 502 server_error / generation_interrupted  an earlier attempt died after writing records
 ├── 503 service_unavailable / model_not_served  this site has no instance of the model
 └── 504 timeout / backend_timeout            an instance went silent past the read bound
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.records import ErrorInfo


class AgentError(Exception):
    """Base of the site agent's exceptions."""


class InvalidBody(AgentError):
    """The request body is not a JSON object."""


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def from_backend(status: int | None, raw: bytes) -> ErrorInfo:
    """Return vLLM's error as ErrorInfo: `{"error": {...}}` or the flat `{"object": "error"}`.

    `status` None (an error event inside a stream) takes the error's own `code` if it is an
    HTTP status, else 502.
    """
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        text = raw.decode(errors="replace").strip()[:500] or f"HTTP {status}"
        return ErrorInfo(
            status=status or 502, message=text, type="server_error", code="backend_error"
        )
    code = body.get("code")
    if status is None:
        status = code if isinstance(code, int) and 400 <= code <= 599 else 502
    return ErrorInfo(
        status=status,
        message=body["message"],
        type=_str_or_none(body.get("type")) or "server_error",
        code=_str_or_none(code),
        param=_str_or_none(body.get("param")),
    )


def invalid_body(reason: str) -> ErrorInfo:
    """Return the error of a body that is not a JSON object."""
    return ErrorInfo(status=400, type="invalid_request_error", code="invalid_body", message=reason)


def backend_unavailable(model: str) -> ErrorInfo:
    """Return the error of a model none of whose instances could be reached."""
    return ErrorInfo(
        status=502,
        type="server_error",
        code="backend_unavailable",
        message=f"No instance of model '{model}' could be reached.",
    )


def model_starting(model: str, waited_s: float, last_error: str) -> ErrorInfo:
    """Return the error of a request whose cold model did not come up in time."""
    why = f" ({last_error})" if last_error else ""
    return ErrorInfo(
        status=503,
        type="server_error",
        code="model_starting",
        message=f"Model '{model}' is starting and was not ready within {waited_s:.0f} s{why}; "
        "try again shortly.",
    )


def backend_error(detail: str) -> ErrorInfo:
    """Return the error of an instance that broke off or garbled its answer."""
    return ErrorInfo(
        status=502,
        type="server_error",
        code="backend_error",
        message=f"The model backend failed: {detail}",
    )


def backend_timeout(limit_s: float) -> ErrorInfo:
    """Return the error of an instance silent for longer than `limit_s`."""
    return ErrorInfo(
        status=504,
        type="timeout",
        code="backend_timeout",
        message=f"The model backend sent nothing for {limit_s:.0f} s.",
    )


def model_not_served(model: str, site_id: str) -> ErrorInfo:
    """Return the error of a request sent to a site that has no instance of its model."""
    return ErrorInfo(
        status=503,
        type="service_unavailable",
        code="model_not_served",
        message=f"Model '{model}' is not served on site '{site_id}'.",
    )


def generation_interrupted() -> ErrorInfo:
    """Return the error of a request whose earlier attempt stopped after writing records."""
    return ErrorInfo(
        status=502,
        type="server_error",
        code="generation_interrupted",
        message="Generation was interrupted and cannot be resumed; retry the request.",
    )
