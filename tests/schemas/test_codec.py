"""The wire codec: round trips, poison detection, and additive evolution of messages."""

from __future__ import annotations

import msgspec
import pytest

from schemas import names
from schemas.codec import (
    DecodeError,
    encode,
    heartbeat_decoder,
    message_decoder,
    record_decoder,
    run_inference_decoder,
    usage_decoder,
)
from schemas.messages import ModelStatus, RunInference, SiteHeartbeat, UsageRecorded
from schemas.records import Chunk, ErrorInfo, Failure, Final, Response, Usage

REQUEST = RunInference(
    request_id="0190c1d2e3f4",
    user_id="u1",
    username="alice",
    groups=("physics",),
    model="smollm2-135m",
    endpoint="chat.completions",
    stream=True,
    include_usage=True,
    body=b'{"model": "smollm2-135m", "messages": []}',
    created_at=1.5,
    expires_at=2.5,
)
USAGE = UsageRecorded(
    request_id="r",
    user_id="u",
    username="alice",
    model="m",
    site_id="s",
    endpoint="completions",
    prompt_tokens=3,
    completion_tokens=4,
    outcome="completed",
    created_at=1.0,
    finished_at=2.0,
)
HEARTBEAT = SiteHeartbeat(
    site_id="polaris",
    agent_id="a1",
    sent_at=10.0,
    interval_s=2.0,
    models=(ModelStatus(model="m", state="hot", instances=1, running=2, waiting=0, capacity=8),),
)


@pytest.mark.parametrize("message", [REQUEST, USAGE, HEARTBEAT])
def test_every_message_round_trips_through_the_union_decoder(message: msgspec.Struct) -> None:
    assert message_decoder.decode(encode(message)) == message


def test_typed_decoders_round_trip() -> None:
    assert run_inference_decoder.decode(encode(REQUEST)) == REQUEST
    assert usage_decoder.decode(encode(USAGE)) == USAGE
    assert heartbeat_decoder.decode(encode(HEARTBEAT)) == HEARTBEAT


@pytest.mark.parametrize(
    "record",
    [
        Chunk(data=b'{"choices": []}'),
        Response(status=200, body=b"{}"),
        Failure(
            error=ErrorInfo(status=400, message="bad", type="invalid_request_error", param="x")
        ),
        Final(
            outcome="completed",
            usage=Usage(prompt_tokens=1, completion_tokens=2),
            site_id="s",
            finished_at=3.0,
        ),
    ],
)
def test_every_record_round_trips(record: msgspec.Struct) -> None:
    assert record_decoder.decode(encode(record)) == record


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\xff not msgpack",
        b"",
        msgspec.msgpack.encode({"type": "LaunchMissiles", "request_id": "x"}),
        msgspec.msgpack.encode({"request_id": "x"}),  # no tag
        encode(USAGE),  # a valid message of the wrong type for this queue
    ],
)
def test_poison_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        run_inference_decoder.decode(payload)


def test_a_message_from_an_older_sender_decodes_with_defaults() -> None:
    """Fields are only ever appended with defaults: an old sender's bytes stay valid."""
    old = msgspec.structs.asdict(REQUEST)
    for appended in ("site_id", "priority", "groups"):
        del old[appended]
    old["type"] = "RunInference"
    decoded = run_inference_decoder.decode(msgspec.msgpack.encode(old))
    assert decoded.site_id == ""
    assert decoded.priority == "interactive"
    assert decoded.groups == ()


def test_a_newer_sender_s_extra_field_is_ignored() -> None:
    newer = msgspec.structs.asdict(USAGE) | {"type": "UsageRecorded", "cost_usd": 0.1}
    assert usage_decoder.decode(msgspec.msgpack.encode(newer)) == USAGE


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        REQUEST.model = "other"  # type: ignore[misc]


def test_names_are_distinct_per_site_and_priority() -> None:
    queues = {names.site_queue(s, p) for s in ("a", "b") for p in names.PRIORITIES}
    keys = {names.site_routing_key(s, p) for s in ("a", "b") for p in names.PRIORITIES}
    assert len(queues) == len(keys) == 4
    assert names.stream_key("r1") != names.stream_key("r2")
    assert names.stream_key("r1").startswith("first:stream:")
