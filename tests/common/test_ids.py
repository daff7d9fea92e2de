"""Request ids: UUIDv7s that sort in the order a process made them and stay unguessable."""

from __future__ import annotations

import time
import uuid

from services.common.ids import new_request_id


def test_ids_made_in_a_burst_sort_in_the_order_they_were_made() -> None:
    ids = [new_request_id() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_an_id_is_a_uuid7_carrying_its_time_and_62_random_bits() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid.UUID(hex=new_request_id())
    after = time.time_ns() // 1_000_000
    assert (value.version, value.variant) == (7, uuid.RFC_4122)
    assert before <= value.int >> 80 <= after + 1
    tails = [uuid.UUID(hex=new_request_id()).int & ((1 << 62) - 1) for _ in range(1000)]
    assert tails != sorted(tails)  # the random part does not count up with the ids
