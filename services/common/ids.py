"""Sortable, unguessable request ids (UUIDv7 layout, RFC 9562).

48 bits of Unix time in ms, a 12-bit counter (RFC 9562's "fixed-length dedicated counter",
section 6.2, method 1: it starts at a random value below 2048 in each new millisecond and
counts up within it), then 62 random bits. So the ids one process makes sort in the order it
made them — a batch's lines keep their order through concurrent handling — and the random
part alone keeps an id unguessable from the one before it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def _next_stamp() -> tuple[int, int]:
    """Return (ms, counter), later than the last pair this process handed out."""
    global _last_ms, _counter
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms, _counter = ms, int.from_bytes(os.urandom(2), "big") & 0x7FF
        elif _counter < 0xFFF:
            _counter += 1  # the same millisecond (or a clock that stepped back)
        else:
            _last_ms, _counter = _last_ms + 1, 0  # counter spent: borrow the next ms
        return _last_ms, _counter


def new_request_id() -> str:
    """Return a UUIDv7 as 32 hex digits: ms time, a counter within the ms, 62 random bits."""
    ms, counter = _next_stamp()
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= counter << 64  # rand_a: the counter
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    return uuid.UUID(int=value).hex
