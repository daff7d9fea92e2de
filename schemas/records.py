"""Records of a request's Redis stream, written by the site agent and read by the gateway.

A stream holds, in order: zero or more `Chunk`s (streaming) or one `Response`
(non-streaming) or one `Failure`, and always ends with exactly one `Final`.
A redelivered request whose stream already has a `Final` is not generated again.
"""

from __future__ import annotations

import msgspec

from schemas.messages import Message, Outcome


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An error in OpenAI's shape, with the HTTP status it maps to."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts as the backend reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of stream records."""


class Chunk(Record, tag=True, frozen=True, kw_only=True):
    """One SSE event's JSON payload as the client gets it.

    `usage` is the backend's cumulative count up to and including this chunk (vLLM's
    `continuous_usage_stats`): if the generation breaks off, the last delivered chunk says
    exactly what to bill.
    """

    data: bytes
    usage: Usage | None = None


class Response(Record, tag=True, frozen=True, kw_only=True):
    """A whole non-streamed response body with its HTTP status."""

    status: int
    body: bytes


class Failure(Record, tag=True, frozen=True, kw_only=True):
    """The request failed; before any chunk this becomes the HTTP status, after it an SSE error."""

    error: ErrorInfo


class Final(Record, tag=True, frozen=True, kw_only=True):
    """The last record: what was delivered and billed."""

    outcome: Outcome
    usage: Usage
    site_id: str
    finished_at: float


AnyRecord = Chunk | Response | Failure | Final


class Reply(Message, tag=True, frozen=True, kw_only=True):
    """A request's stream folded into one message, for the reply queue its producer named.

    Sent at least once (a redelivered request replies again): receivers keep the first per
    `request_id`. `status` is the HTTP status the gateway would have answered; a streamed
    request's events are in `chunks`, a non-streamed body in `body`.
    """

    request_id: str
    status: int
    outcome: Outcome
    usage: Usage
    body: bytes = b""
    chunks: tuple[bytes, ...] = ()
    error: ErrorInfo | None = None

    def json(self) -> object:
        """Return the response body as JSON (None if there is none)."""
        return msgspec.json.decode(self.body) if self.body else None
