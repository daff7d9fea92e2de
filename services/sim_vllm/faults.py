"""Injected faults: failing requests, streams that break off or stall, an unhealthy /health.

Faults are set at start (settings) and replaced as a whole at run time (POST /sim/faults with
the JSON of `Faults`; `{}` clears them). Request numbers for `fail_nth` count inference
requests (chat, completions, embeddings) from 1, restarting whenever the faults are replaced.
"""

from __future__ import annotations

import random
from typing import Annotated

import msgspec

Count = Annotated[int, msgspec.Meta(ge=0)]
Nth = Annotated[int, msgspec.Meta(ge=1)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class Faults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to break; every field off by default."""

    fail_nth: Nth | list[Nth] = []
    """Answer these requests (numbered from 1) with a 500 in vLLM's error shape."""
    fail_rate: Rate = 0.0
    """Answer this fraction of requests with a 500 (seeded, so runs repeat)."""
    close_after_tokens: Count | None = None
    """Close a stream's connection abruptly after this many tokens: no [DONE]."""
    stall_after_tokens: Count | None = None
    """Stop a stream after this many tokens but keep the connection open."""
    unhealthy: bool = False
    """Answer GET /health with 503, as vLLM does when its engine is dead."""

    @property
    def failing(self) -> frozenset[int]:
        """Return the request numbers to fail."""
        return frozenset([self.fail_nth] if isinstance(self.fail_nth, int) else self.fail_nth)


_decoder = msgspec.json.Decoder(Faults)


def decode(body: bytes) -> Faults:
    """Read faults from JSON; raise msgspec.ValidationError or DecodeError when invalid."""
    return _decoder.decode(body or b"{}")


class Injector:
    """Decides, request by request, whether to inject a failure."""

    def __init__(self, faults: Faults, seed: int = 0) -> None:
        self._seed = seed
        self.replace(faults)

    def replace(self, faults: Faults) -> None:
        """Install new faults and restart request numbering and the random sequence."""
        self.faults = faults
        self._failing = faults.failing
        self._count = 0
        self._random = random.Random(self._seed)  # noqa: S311 - simulated faults, not security

    def next_request_fails(self) -> int | None:
        """Count one inference request; return its number if it must fail, else None."""
        self._count += 1
        rate = self.faults.fail_rate
        if self._count in self._failing or (rate > 0 and self._random.random() < rate):
            return self._count
        return None
