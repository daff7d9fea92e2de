"""Edge validation of OpenAI request bodies (msgspec: fast, and it names the failing field).

Only what a backend could not answer sensibly is checked here; unknown fields (vLLM's
extras such as `ignore_eos`) pass through untouched to the backend.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.messages import Endpoint
from services.access.errors import InvalidRequest

PositiveInt = Annotated[int, Meta(ge=1)]
Role = Literal["system", "user", "assistant", "tool", "developer", "function"]
PromptInput = str | list[str | int | list[int]]


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class _Sampling(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    n: PositiveInt | None = None
    stop: str | list[str] | None = None
    user: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(_Sampling, kw_only=True):
    prompt: PromptInput


class EmbeddingRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


AnyRequest = ChatRequest | CompletionRequest | EmbeddingRequest

_DECODERS: dict[Endpoint, msgspec.json.Decoder[Any]] = {
    "chat.completions": msgspec.json.Decoder(ChatRequest),
    "completions": msgspec.json.Decoder(CompletionRequest),
    "embeddings": msgspec.json.Decoder(EmbeddingRequest),
}
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")


def parse_body(endpoint: Endpoint, body: bytes) -> AnyRequest:
    """Decode and check `body` for `endpoint`, or raise InvalidRequest naming the field."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        parsed: AnyRequest = _DECODERS[endpoint].decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        param = match.group("path") if match else None
        missing = _MISSING.search(text)
        if missing:
            field = missing.group("field")
            param = f"{param}.{field}" if param else field
        reason = _PATH.sub("", text)
        where = f" at `{param}`" if param else ""
        raise InvalidRequest(f"Invalid request body{where}: {reason}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from exc
    return parsed


def include_usage(request: AnyRequest) -> bool:
    """Tell whether a streaming client asked for the final usage chunk."""
    options = getattr(request, "stream_options", None)
    return bool(options and options.include_usage)


def check_max_tokens(request: AnyRequest, cap: int | None) -> None:
    """Refuse (400) a request asking for more tokens than the operator's cap allows."""
    if cap is None:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        asked = getattr(request, field, None)
        if asked is not None and asked > cap:
            raise InvalidRequest(
                f"`{field}` is {asked}; this service allows at most {cap}.",
                param=field,
                code="max_tokens_too_large",
            )
