"""Read vLLM request bodies: the fields the simulator uses, validated where vLLM answers 400.

Token counts are deterministic stand-ins for a tokenizer: a prompt costs one token per
whitespace-separated word, each chat message `MESSAGE_OVERHEAD` more (its template), a chat
`CHAT_OVERHEAD` more (the generation prompt).
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

MESSAGE_OVERHEAD = 4
CHAT_OVERHEAD = 2

Kind = Literal["chat", "completions"]
T = TypeVar("T")


class InvalidRequest(Exception):
    """A request vLLM refuses: 400 unless said otherwise; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


Prompt = str | list[str | int | list[int]]


class ChatRequest(msgspec.Struct, kw_only=True):
    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(msgspec.Struct, kw_only=True):
    prompt: Prompt
    model: str | None = None
    max_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: Prompt
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


_chat = msgspec.json.Decoder(ChatRequest)
_completion = msgspec.json.Decoder(CompletionRequest)
_embedding = msgspec.json.Decoder(EmbeddingRequest)


class Plan(msgspec.Struct, frozen=True):
    """What a generation request asks for, after validation."""

    model: str | None
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _message_tokens(message: Message) -> int:
    content = message.content
    if isinstance(content, list):
        return MESSAGE_OVERHEAD + sum(_words(part.text) for part in content)
    return MESSAGE_OVERHEAD + _words(content)


def count_tokens(prompt: str | list[int]) -> int:
    """Return the tokens of one prompt: its words, or its token ids."""
    return _words(prompt) if isinstance(prompt, str) else len(prompt)


def _prompts(value: Prompt) -> list[str | list[int]]:
    """Split a prompt field into prompts: a string, a list of them, ids, or lists of ids."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [[v for v in value if isinstance(v, int)]]
    if any(isinstance(v, int) for v in value):
        raise InvalidRequest("prompt mixes token ids with texts", "prompt")
    return [v for v in value if not isinstance(v, int)]


def _decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Invalid JSON body: {exc}") from exc


def _plan(
    model: str | None,
    prompt_tokens: int,
    max_tokens: int | None,
    stream: bool | None,
    options: StreamOptions | None,
    default_max_tokens: int,
) -> Plan:
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(
            f"max_tokens must be at least 1, got {max_tokens}. "
            f"(parameter=max_tokens, value={max_tokens})",
            "max_tokens",
        )
    # vLLM: continuous usage needs include_usage too (should_include_usage)
    include = bool(options and options.include_usage)
    continuous = include and bool(options and options.continuous_usage_stats)
    return Plan(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        stream=bool(stream),
        include_usage=include,
        continuous_usage=continuous,
    )


def parse_generation(kind: Kind, body: bytes, default_max_tokens: int) -> Plan:
    """Read a chat or completions body; raise InvalidRequest where vLLM answers 400."""
    if kind == "chat":
        chat = _decode(_chat, body)
        tokens = CHAT_OVERHEAD + sum(_message_tokens(m) for m in chat.messages)
        limit = (
            chat.max_tokens if chat.max_completion_tokens is None else chat.max_completion_tokens
        )
        return _plan(
            chat.model, tokens, limit, chat.stream, chat.stream_options, default_max_tokens
        )
    request = _decode(_completion, body)
    prompts = _prompts(request.prompt)
    if len(prompts) != 1:
        raise InvalidRequest("the simulator serves exactly one prompt per request", "prompt")
    return _plan(
        request.model,
        count_tokens(prompts[0]),
        request.max_tokens,
        request.stream,
        request.stream_options,
        default_max_tokens,
    )


def parse_embedding(body: bytes) -> tuple[EmbeddingRequest, list[str | list[int]]]:
    """Read an embeddings body and split its input into the texts (or ids) to embed."""
    request = _decode(_embedding, body)
    inputs = _prompts(request.input)
    if not inputs:
        raise InvalidRequest("input must not be empty", "input")
    return request, inputs


def check_length(plan: Plan, max_model_len: int) -> None:
    """Raise InvalidRequest like vLLM when the prompt, or prompt plus max_tokens, does not fit."""
    p, k, m = plan.prompt_tokens, plan.max_tokens, max_model_len
    if p >= m:
        raise InvalidRequest(
            f"This model's maximum context length is {m} tokens. However, your request has "
            f"{p} input tokens. Please reduce the length of the input messages. "
            f"(parameter=input_tokens, value={p})",
            "input_tokens",
        )
    if p + k > m:
        raise InvalidRequest(
            f"'max_tokens' or 'max_completion_tokens' is too large: {k}. This model's maximum "
            f"context length is {m} tokens and your request has {p} input tokens "
            f"({k} > {m} - {p}). (parameter=max_tokens, value={k})",
            "max_tokens",
        )


def check_model(requested: str | None, served: str) -> None:
    """Raise a 404 like vLLM's when the request names a model this server does not serve."""
    if requested is not None and requested != served:
        raise InvalidRequest(f"The model `{requested}` does not exist.", "model", 404)
