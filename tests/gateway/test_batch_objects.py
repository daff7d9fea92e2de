"""OpenAI's batch objects and output lines, built from rows (pure)."""

from __future__ import annotations

import json
from typing import Any

from schemas.records import ErrorInfo, Reply, Usage
from services.gateway.batch_db import BatchRow, LineRow
from services.gateway.batch_objects import batch_object, result_file_id, result_files, result_of


def row(line_no: int, **over: Any) -> LineRow:
    values: dict[str, Any] = {
        "batch_id": "batch_x",
        "line_no": line_no,
        "custom_id": f"c{line_no}",
        "request_id": f"r{line_no}",
        "body": b"{}",
        "state": "done",
        "published_at": 1.0,
        "status_code": 200,
        "response": b'{"object": "chat.completion"}',
        "error_code": None,
        "error_message": None,
    }
    values.update(over)
    return LineRow(**values)


def test_results_split_into_output_and_error_files_in_input_order() -> None:
    lines = [
        row(1),
        row(2, status_code=None, response=None, request_id=None, error_code="batch_expired"),
        row(3, status_code=400, response=b'{"error": {"message": "bad"}}'),
        row(4),
    ]
    out, err = result_files("batch_x", lines)
    outputs = [json.loads(x) for x in out.splitlines()]
    errors = [json.loads(x) for x in err.splitlines()]
    assert [o["custom_id"] for o in outputs] == ["c1", "c4"]
    assert outputs[0] == {
        "id": "batch_req_r1",
        "custom_id": "c1",
        "response": {
            "status_code": 200,
            "request_id": "r1",
            "body": {"object": "chat.completion"},
        },
        "error": None,
    }
    assert [e["custom_id"] for e in errors] == ["c2", "c3"]
    assert errors[0]["response"] is None
    assert errors[0]["error"]["code"] == "batch_expired"
    assert errors[0]["id"].startswith("batch_req_")
    assert errors[1]["response"]["status_code"] == 400


def test_a_reply_without_a_body_becomes_its_error_body() -> None:
    error = ErrorInfo(status=503, message="no site", type="server_error", code="no_site")
    status, body = result_of(
        Reply(request_id="r", status=503, outcome="failed", usage=Usage(), error=error)
    )
    assert status == 503
    assert json.loads(body)["error"]["code"] == "no_site"
    assert result_of(
        Reply(request_id="r", status=200, outcome="completed", usage=Usage(), body=b"{}")
    ) == (200, b"{}")


def test_result_file_ids_are_the_same_on_every_finalization() -> None:
    assert result_file_id("batch_abc", "output") == result_file_id("batch_abc", "output")
    assert result_file_id("batch_abc", "output") != result_file_id("batch_abc", "error")


def test_a_batch_object_has_openai_fields_and_counts() -> None:
    batch = BatchRow(
        batch_id="batch_x",
        user_id="u",
        username="alice",
        groups="[]",
        endpoint="/v1/chat/completions",
        input_file_id="file-1",
        completion_window="24h",
        metadata='{"k": "v"}',
        status="in_progress",
        total=5,
        errors=None,
        output_file_id=None,
        error_file_id=None,
        created_at=10.5,
        expires_at=100.0,
        in_progress_at=11.0,
    )
    obj = batch_object(batch, {"completed": 2, "failed": 1, "pending": 2})
    assert obj["request_counts"] == {"total": 5, "completed": 2, "failed": 1}
    assert (obj["object"], obj["created_at"], obj["in_progress_at"]) == ("batch", 10, 11)
    assert obj["metadata"] == {"k": "v"}
    assert obj["completed_at"] is None
