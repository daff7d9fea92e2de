"""Structured logs: one JSON object per line, with the request/user/site ids from context."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from services.common.logging import (
    JsonFormatter,
    configure_logging,
    fresh_context,
    request_id_var,
    site_id_var,
    user_id_var,
)
from tests.common.helpers import capture_json

logger = logging.getLogger("services.test_logging")


def test_a_line_is_one_json_object_with_time_level_logger_and_formatted_message() -> None:
    with capture_json() as logs:
        logger.info("routed %s to %s in %.1f s", "m", "site-a", 0.25)
    (line,) = logs.lines()
    assert set(line) == {"ts", "level", "logger", "msg"}  # no ids outside a request
    assert (line["level"], line["logger"]) == ("INFO", "services.test_logging")
    assert line["msg"] == "routed m to site-a in 0.2 s"
    assert isinstance(line["ts"], float)


def test_context_ids_appear_on_every_line_logged_while_they_are_set() -> None:
    with capture_json() as logs, fresh_context():
        request_id_var.set("0190abcd")
        user_id_var.set("alice")
        site_id_var.set("polaris")
        logger.warning("one")
        logger.info("two")
    with capture_json() as after:
        logger.info("three")
    assert [
        (line["msg"], line["request_id"], line["user_id"], line["site_id"]) for line in logs.lines()
    ] == [("one", "0190abcd", "alice", "polaris"), ("two", "0190abcd", "alice", "polaris")]
    assert "request_id" not in after.lines()[0]  # fresh_context restored the empty context


def test_an_explicit_id_wins_over_the_context_and_multiline_text_stays_on_one_line() -> None:
    with capture_json() as logs, fresh_context():
        request_id_var.set("from-context")
        logger.info("cancel received\nsecond line", extra={"request_id": "explicit"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    assert len(logs.text().splitlines()) == 2
    first, second = logs.lines()
    assert (first["request_id"], first["msg"]) == ("explicit", "cancel received\nsecond line")
    assert second["request_id"] == "from-context"
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exc"]


async def test_ids_set_in_a_task_reach_its_child_tasks_but_not_sibling_requests() -> None:
    async def handle(request_id: str) -> None:
        request_id_var.set(request_id)
        await asyncio.sleep(0)
        await asyncio.create_task(child())  # as the site agent's forwarding task

    async def child() -> None:
        logger.info("child")

    with capture_json() as logs:
        await asyncio.gather(handle("r1"), handle("r2"))
    assert sorted(line["request_id"] for line in logs.lines()) == ["r1", "r2"]


def test_non_ascii_text_and_odd_arguments_still_make_valid_json() -> None:
    formatter = JsonFormatter()
    args = ("ünï", b"\x00")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "naïve %s %r", args, None)
    parsed = json.loads(formatter.format(record))
    assert parsed["msg"] == "naïve ünï b'\\x00'"


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_configure_logging_sends_json_with_ids_and_warnings_to_stderr(
    restore_root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json_logs=True)
    with fresh_context():
        user_id_var.set("bob")
        logging.getLogger("services.any").info("hello")
        logging.getLogger("services.any").debug("not at INFO")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful", UserWarning, stacklevel=1)
    sys.stderr.flush()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line.get("user_id")) for line in lines] == [
        ("services.any", "bob"),
        ("py.warnings", "bob"),
    ]
    assert "careful" in lines[1]["msg"]
