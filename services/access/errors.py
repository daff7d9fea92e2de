"""Why a request is refused: every door (HTTP edge, `first.ingress`) answers with these.

Each carries its HTTP status and OpenAI error fields; the HTTP edge renders them in OpenAI's
shape (services/gateway/errors.py), the router puts `info()` on the request's stream.

ApiError (status, type, code, message, param)
├── InvalidRequest         400 invalid_request_error
├── Unauthenticated        401 invalid_api_key
├── PermissionDenied       403 permission_denied
├── NotFound               404 (model_not_found, not_found)
├── PayloadTooLarge        413 request_too_large
├── RateLimited            429 rate_limit_exceeded
├── QuotaExceeded          429 insufficient_quota
├── Unavailable            503 (auth_unavailable, no_site_available, queue_unavailable), Retry-After
└── UpstreamTimeout        504 timeout
"""

from __future__ import annotations

from schemas.records import ErrorInfo


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error body."""

    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def info(self) -> ErrorInfo:
        """Return the error as the record type the rest of the system uses."""
        return ErrorInfo(
            status=self.status,
            message=self.message,
            type=self.type,
            code=self.code,
            param=self.param,
        )


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(ApiError):
    status = 401
    type = "invalid_request_error"


class PermissionDenied(ApiError):
    status = 403
    type = "invalid_request_error"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"


class UpstreamTimeout(ApiError):
    status = 504
    type = "timeout"


class RateLimited(ApiError):
    """429: a per-minute rate limit (OpenAI: code `rate_limit_exceeded`)."""

    status = 429
    type = "rate_limit_exceeded"


class QuotaExceeded(ApiError):
    """429: a token budget for the day or month is spent (OpenAI: `insufficient_quota`)."""

    status = 429
    type = "insufficient_quota"
