"""The SSE splitter: whole events' data from bytes read in arbitrary pieces."""

from __future__ import annotations

import pytest

from services.site_agent.sse import DONE, SSESplitter

STREAM = (
    b'data: {"n": 1}\n\n'
    b": keep-alive comment\n\n"
    b'event: message\nid: 7\ndata: {"n": 2}\n\n'
    b'data: {"n":\ndata: 3}\n\n'
    b"\n\n"
    b"data:[DONE]\n\n"
)
EVENTS = [b'{"n": 1}', b'{"n": 2}', b'{"n":\n3}', DONE]


def feed_all(pieces: list[bytes]) -> list[bytes]:
    splitter = SSESplitter()
    events = [event for piece in pieces for event in splitter.feed(piece)]
    return events + splitter.close()


def test_several_events_in_one_read_come_out_together_in_order() -> None:
    splitter = SSESplitter()
    assert splitter.feed(STREAM) == EVENTS
    assert splitter.close() == []


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_an_event_split_anywhere_across_two_reads_comes_out_once_whole(line_end: bytes) -> None:
    stream = STREAM.replace(b"\n", line_end)
    for cut in range(len(stream) + 1):
        assert feed_all([stream[:cut], stream[cut:]]) == EVENTS, f"cut at {cut}"


def test_byte_by_byte_crlf_reads_give_the_same_events() -> None:
    stream = STREAM.replace(b"\n", b"\r\n")
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == EVENTS


def test_a_crlf_split_between_reads_is_one_line_end_not_two() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\ndata: b\r") == []
    assert splitter.feed(b"\n\r") == []  # the CR may still be half of a CRLF
    assert splitter.feed(b"\n") == [b"a\nb"]


def test_the_partial_event_waits_for_the_read_that_completes_it() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b'data: {"n": 1}\n\ndata: {"n"') == [b'{"n": 1}']
    assert splitter.feed(b": 2}\n") == []
    assert splitter.feed(b"\n") == [b'{"n": 2}']


def test_a_last_event_without_its_blank_line_counts_only_if_its_lines_are_whole() -> None:
    ended = SSESplitter()
    assert ended.feed(b"data: [DONE]\n") == []
    assert ended.close() == [DONE]
    cut = SSESplitter()
    assert cut.feed(b'data: {"n": 1}\n\ndata: {"choi') == [b'{"n": 1}']
    assert cut.close() == []  # a broken connection's half line is not passed on


def test_events_without_data_yield_nothing() -> None:
    assert feed_all([b": ping\n\n\n\nevent: x\n\nretry: 5\n\n"]) == []
