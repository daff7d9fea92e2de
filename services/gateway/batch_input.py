"""Validation of a batch input file at upload (pure): every line or the first bad one named.

A line is OpenAI's `{"custom_id", "method": "POST", "url", "body"}`. Decisions:
- all lines of one file share one `url` (a batch has one `endpoint`, as at OpenAI);
- the body is checked exactly as the endpoint would check it (`check_body`, which the routes
  build from services/gateway/admission.check_request), so a line fails at upload, not later;
- `stream` is dropped from each body when the line runs: a batch line is never streamed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from schemas.messages import Endpoint
from services.access.errors import ApiError, InvalidRequest

URLS: Final[dict[str, Endpoint]] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
"""The endpoints a batch may run (the gateway serves all three)."""
URL_OF: Final[dict[Endpoint, str]] = {endpoint: url for url, endpoint in URLS.items()}

CheckBody = Callable[[Endpoint, bytes], None]
"""Raises the ApiError the endpoint would answer for this body."""


class InputLine(msgspec.Struct, frozen=True, kw_only=True):
    """One request of a batch file, its body as JSON bytes."""

    line: int
    custom_id: str
    body: bytes


class InputFile(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    lines: tuple[InputLine, ...]


_decode = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder()


def _bad(line: int, message: str, code: str) -> InvalidRequest:
    return InvalidRequest(f"Line {line}: {message}", code=code, param="file")


def _one(number: int, raw: bytes, check_body: CheckBody) -> tuple[str, str, bytes]:
    try:
        item = _decode.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad(number, f"not a JSON object ({exc}).", "invalid_json_line") from exc
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _bad(number, "`custom_id` must be a non-empty string.", "missing_custom_id")
    if item.get("method") != "POST":
        raise _bad(number, "`method` must be `POST`.", "invalid_method")
    url = item.get("url")
    if not isinstance(url, str) or url not in URLS:
        raise _bad(number, f"`url` must be one of {', '.join(URLS)}.", "invalid_url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _bad(number, "`body` must be a JSON object.", "invalid_body")
    encoded = _encode.encode(body)
    try:
        check_body(URLS[url], encoded)
    except ApiError as exc:
        raise _bad(number, exc.message, exc.code or "invalid_body") from exc
    return custom_id, url, encoded


def parse_input(data: bytes, max_lines: int, check_body: CheckBody) -> InputFile:
    """Return the file's lines, or raise InvalidRequest naming the first bad line (1-based)."""
    lines: list[InputLine] = []
    seen: set[str] = set()
    url = ""
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue  # a trailing newline or blank line is no request
        if len(lines) >= max_lines:
            raise _bad(
                number, f"a batch file holds at most {max_lines} requests.", "too_many_lines"
            )
        custom_id, line_url, body = _one(number, raw, check_body)
        if custom_id in seen:
            raise _bad(number, f"`custom_id` {custom_id!r} is used twice.", "duplicate_custom_id")
        if url and line_url != url:
            raise _bad(number, f"every line must use the same `url` ({url}).", "mixed_urls")
        seen.add(custom_id)
        url = line_url
        lines.append(InputLine(line=number, custom_id=custom_id, body=body))
    if not lines:
        raise InvalidRequest("The file holds no requests.", code="empty_file", param="file")
    return InputFile(url=url, lines=tuple(lines))


def run_body(body: bytes) -> bytes:
    """Return a line's body as it runs: never streamed (`stream`, `stream_options` dropped)."""
    item = _decode.decode(body)
    item.pop("stream", None)
    item.pop("stream_options", None)
    return _encode.encode(item)
