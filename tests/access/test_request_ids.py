"""Which request ids a direct producer may use (pure: no Redis, no broker)."""

from __future__ import annotations

import time
import uuid

import pytest

from services.access.errors import InvalidRequest
from services.access.request_ids import check_id, id_time, owner_of
from services.common.ids import new_request_id


def test_a_fresh_id_made_by_first_is_accepted_and_its_time_read_back() -> None:
    now = time.time()
    request_id = new_request_id()
    check_id(request_id, now, skew_s=600)
    made = id_time(request_id)
    assert made is not None
    assert abs(made - now) < 1.0


@pytest.mark.parametrize(
    "request_id",
    [uuid.uuid4().hex, new_request_id().upper(), new_request_id()[:-1], "", "x" * 32],
)
def test_anything_but_a_uuid7_in_32_lowercase_hex_digits_is_refused(request_id: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_id(request_id, time.time(), skew_s=600)
    assert refused.value.code == "invalid_request_id"


@pytest.mark.parametrize("offset_s", [-601.0, 601.0])
def test_an_id_made_beyond_the_skew_either_way_is_refused(offset_s: float) -> None:
    request_id = new_request_id()
    made = id_time(request_id)
    assert made is not None
    with pytest.raises(InvalidRequest):
        check_id(request_id, made + offset_s, skew_s=600)
    check_id(request_id, made + offset_s / 2, skew_s=600)


def test_the_owner_changes_with_the_user_and_with_what_was_asked() -> None:
    base = owner_of("alice", "chat.completions", b'{"a":1}')
    assert base == owner_of("alice", "chat.completions", b'{"a":1}')
    assert base != owner_of("mallory", "chat.completions", b'{"a":1}')
    assert base != owner_of("alice", "chat.completions", b'{"a":2}')
    assert base != owner_of("alice", "completions", b'{"a":1}')
