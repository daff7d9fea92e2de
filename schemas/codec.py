"""Encoders and decoders, made once per process (msgpack on the wire)."""

from __future__ import annotations

from typing import Final

import msgspec

from schemas.messages import (
    AnyMessage,
    ControlMessage,
    IngressRequest,
    RunInference,
    SiteHeartbeat,
    UsageRecorded,
)
from schemas.records import AnyRecord, Reply

DecodeError = msgspec.DecodeError
"""Raised for bytes that are not a valid message (undecodable, unknown tag, wrong fields)."""

_encoder: Final = msgspec.msgpack.Encoder()

message_decoder: Final = msgspec.msgpack.Decoder(AnyMessage)
run_inference_decoder: Final = msgspec.msgpack.Decoder(RunInference)
ingress_decoder: Final = msgspec.msgpack.Decoder(IngressRequest)
usage_decoder: Final = msgspec.msgpack.Decoder(UsageRecorded)
heartbeat_decoder: Final = msgspec.msgpack.Decoder(SiteHeartbeat)
record_decoder: Final = msgspec.msgpack.Decoder(AnyRecord)
reply_decoder: Final = msgspec.msgpack.Decoder(Reply)
control_decoder: Final = msgspec.msgpack.Decoder(ControlMessage)


def encode(obj: msgspec.Struct) -> bytes:
    """Encode a message or a record to msgpack."""
    return _encoder.encode(obj)
