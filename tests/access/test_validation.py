"""Edge validation names the failing field and lets backend extras through."""

from __future__ import annotations

import json

import pytest

from services.access.errors import InvalidRequest
from services.access.validation import ChatRequest, check_max_tokens, include_usage, parse_body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": 1, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
        (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 3}', "temperature"),
    ],
)
def test_schema_violation_names_the_field(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body("chat.completions", body)
    assert info.value.param == param
    assert info.value.status == 400
    assert param.split("[")[0] in info.value.message


@pytest.mark.parametrize("body", [b"{not json", b"", b"   "])
def test_malformed_json_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_body("completions", body)
    assert info.value.code == "invalid_json"


def test_backend_extras_pass_and_stream_options_are_read() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": true,'
        b' "stream": true, "stream_options": {"include_usage": true}}'
    )
    parsed = parse_body("chat.completions", body)
    assert isinstance(parsed, ChatRequest)
    assert parsed.stream is True
    assert include_usage(parsed) is True


def test_prompt_and_input_accept_openai_shapes() -> None:
    for prompt in (b'"x"', b'["a", "b"]', b"[1, 2, 3]", b"[[1, 2], [3]]"):
        parse_body("completions", b'{"model": "m", "prompt": ' + prompt + b"}")
        parse_body("embeddings", b'{"model": "m", "input": ' + prompt + b"}")
    with pytest.raises(InvalidRequest) as info:
        parse_body("embeddings", b'{"model": "m", "input": {"a": 1}}')
    assert info.value.param == "input"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_request_over_the_max_tokens_cap_is_refused_naming_the_field(field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], field: 65}
    parsed = parse_body("chat.completions", json.dumps(body).encode())
    check_max_tokens(parsed, None)  # no cap: anything goes
    check_max_tokens(parsed, 65)
    with pytest.raises(InvalidRequest) as refused:
        check_max_tokens(parsed, 64)
    assert (refused.value.param, refused.value.code) == (field, "max_tokens_too_large")
