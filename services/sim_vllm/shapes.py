"""vLLM's response shapes: bodies, SSE chunks, errors, deterministic text and vectors.

Field order and presence follow vLLM's pydantic models as they serialise: stream chunks are
dumped with `exclude_unset` (so `usage` appears only with continuous usage stats, `role` only
in the first chat delta, `stop_reason` only in the last chat chunk), the usage-only chunk
drops nulls, and full bodies keep every field.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import sys
import time
from array import array
from typing import Any

import msgspec

from services.sim_vllm.parsing import Kind

DONE = b"data: [DONE]\n\n"
FINISH_REASON = "length"  # every answer runs to max_tokens, as with vLLM's ignore_eos
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError"}
_encode = msgspec.json.Encoder().encode


def new_id(prefix: str) -> str:
    """Return a request id like vLLM's: a prefix and 32 hex digits."""
    return f"{prefix}-{os.urandom(16).hex()}"


def token_text(number: int) -> str:
    """Return the text of generated token `number` (from 1)."""
    return f" tok{number}"


def completion_text(count: int) -> str:
    """Return the whole text of `count` generated tokens."""
    return "".join([token_text(i) for i in range(1, count + 1)])


def usage(prompt: int, completion: int, *, full: bool = False) -> dict[str, Any]:
    """Return vLLM's usage object; `full` (complete bodies) adds the null details."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if full:
        body["prompt_tokens_details"] = None
    return body


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """Return vLLM's error body (0.11+: the fields nested under `error`)."""
    kind = _ERROR_TYPES.get(status, "InternalServerError")
    return _encode({"error": {"message": message, "type": kind, "param": param, "code": status}})


class StreamWriter:
    """Builds one stream's SSE events (`data: {json}\\n\\n`), like vLLM's stream generators."""

    def __init__(
        self, kind: Kind, model: str, prompt_tokens: int, max_tokens: int, continuous: bool
    ) -> None:
        self.kind = kind
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.continuous = continuous

    def _event(self, choices: list[dict[str, Any]], completion: int | None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if completion is not None:
            chunk["usage"] = usage(self.prompt_tokens, completion)
        return b"data: " + _encode(chunk) + b"\n\n"

    def role(self) -> bytes:
        """Return the first chat event: the assistant role with empty content."""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._event([choice], 0 if self.continuous else None)

    def token(self, number: int) -> bytes:
        """Return the event of token `number` (from 1); the last one carries finish_reason."""
        last = number >= self.max_tokens
        finish = FINISH_REASON if last else None
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": token_text(number)}}
            choice.update(logprobs=None, finish_reason=finish)
            if last:
                choice["stop_reason"] = None
        else:
            choice = {"index": 0, "text": token_text(number), "logprobs": None}
            choice.update(finish_reason=finish, stop_reason=None)
        return self._event([choice], number if self.continuous else None)

    def usage(self) -> bytes:
        """Return the usage-only event that ends a stream with include_usage."""
        return self._event([], self.max_tokens)


def chat_body(model: str, prompt_tokens: int, max_tokens: int) -> bytes:
    """Return a non-streamed chat completion."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": completion_text(max_tokens),
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    choice = {"index": 0, "message": message, "logprobs": None}
    choice.update(finish_reason=FINISH_REASON, stop_reason=None)
    return _body("chatcmpl", "chat.completion", model, choice, prompt_tokens, max_tokens)


def completion_body(model: str, prompt_tokens: int, max_tokens: int) -> bytes:
    """Return a non-streamed text completion."""
    choice = {"index": 0, "text": completion_text(max_tokens), "logprobs": None}
    choice.update(finish_reason=FINISH_REASON, stop_reason=None, prompt_logprobs=None)
    return _body("cmpl", "text_completion", model, choice, prompt_tokens, max_tokens)


def _body(
    prefix: str, obj: str, model: str, choice: dict[str, Any], prompt: int, completion: int
) -> bytes:
    return _encode(
        {
            "id": new_id(prefix),
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt, completion, full=True),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


def embed(item: str | list[int], dimensions: int) -> list[float]:
    """Return a deterministic unit vector for a text (or token ids)."""
    key = item.encode() if isinstance(item, str) else array("q", item).tobytes()
    raw = array("h", hashlib.shake_256(key).digest(2 * dimensions))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def encode_floats(vector: list[float]) -> str:
    """Return vLLM's base64 encoding of a vector: little-endian float32."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def embeddings_body(
    model: str, vectors: list[list[float]], prompt_tokens: int, as_base64: bool
) -> bytes:
    """Return an embeddings response (vectors as float lists or base64 float32)."""
    data = [
        {
            "index": i,
            "object": "embedding",
            "embedding": encode_floats(vector) if as_base64 else vector,
        }
        for i, vector in enumerate(vectors)
    ]
    return _encode(
        {
            "id": new_id("embd"),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": usage(prompt_tokens, 0, full=True),
        }
    )


def models_body(model: str, max_model_len: int, created: int) -> bytes:
    """Return GET /v1/models: the one served model, as vLLM lists it."""
    permission = {
        "id": f"modelperm-{model}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return _encode({"object": "list", "data": [card]})
