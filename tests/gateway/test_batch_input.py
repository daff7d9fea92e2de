"""Validation of batch input files at upload (pure): the first bad line is named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from schemas.messages import Endpoint
from services.access.errors import InvalidRequest, NotFound
from services.gateway.batch_input import parse_input, run_body


def line(custom_id: str = "a", url: str = "/v1/chat/completions", **over: Any) -> bytes:
    item: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    item.update(over)
    return json.dumps(item).encode()


def accept(_endpoint: Endpoint, _body: bytes) -> None:
    return None


def refused(data: bytes, max_lines: int = 100) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_input(data, max_lines, accept)
    return caught.value


def test_a_good_file_gives_every_line_with_its_number_and_one_url() -> None:
    data = b"\n".join([line("a"), b"", line("b")]) + b"\n"
    parsed = parse_input(data, 100, accept)
    assert parsed.url == "/v1/chat/completions"
    assert [(x.line, x.custom_id) for x in parsed.lines] == [(1, "a"), (3, "b")]
    assert json.loads(parsed.lines[0].body)["model"] == "m"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"{not json", "invalid_json_line"),
        (line(custom_id=""), "missing_custom_id"),
        (line(method="GET"), "invalid_method"),
        (line(url="/v1/images"), "invalid_url"),
        (line(body=[1]), "invalid_body"),
        (line("a"), "duplicate_custom_id"),
        (line("z", url="/v1/completions"), "mixed_urls"),
    ],
)
def test_the_first_bad_line_is_named_with_its_reason(bad: bytes, code: str) -> None:
    error = refused(b"\n".join([line("a"), line("b"), bad, b"{also bad"]))
    assert error.code == code
    assert error.message.startswith("Line 3: ")
    assert error.param == "file"


def test_a_body_the_endpoint_would_refuse_fails_the_file_at_its_line() -> None:
    def check(endpoint: Endpoint, body: bytes) -> None:
        if json.loads(body)["model"] == "nope":
            raise NotFound("The model `nope` does not exist.", code="model_not_found")

    bad = line("b", body={"model": "nope", "messages": []})
    with pytest.raises(InvalidRequest) as caught:
        parse_input(line("a") + b"\n" + bad, 100, check)
    assert caught.value.code == "model_not_found"
    assert caught.value.message == "Line 2: The model `nope` does not exist."


def test_more_lines_than_the_limit_and_an_empty_file_are_refused() -> None:
    error = refused(b"\n".join(line(str(i)) for i in range(4)), max_lines=3)
    assert (error.code, error.message.split(":")[0]) == ("too_many_lines", "Line 4")
    assert refused(b"\n\n").code == "empty_file"


def test_a_line_runs_without_streaming() -> None:
    body = json.dumps({"model": "m", "stream": True, "stream_options": {"x": 1}}).encode()
    assert json.loads(run_body(body)) == {"model": "m"}
