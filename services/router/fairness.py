"""Fair share between users by tokens: a Virtual Token Counter (VTC), pure.

After Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024): every user has a
counter of the service it received, in tokens (prompt tokens weighted, plus completion tokens);
the held batch line to dispatch next is the head line of the user with the least counter. A
user who had nothing waiting and gets new work is lifted to the least counter among the users
with work waiting, so that idling earns no credit to flood with later.

Service is charged at dispatch from an estimate (the router cannot know the answer's length:
it charges `max_tokens`) and corrected when the site's UsageRecorded arrives. Only what this
router replica dispatched is counted: each replica shares what it holds (see dispatch.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from schemas.messages import RunInference

CHARS_PER_TOKEN: Final = 4
"""The usual rule of thumb for English text; the usage report corrects the estimate."""
DEFAULT_MAX_TOKENS: Final = 256
"""Completion tokens charged for a request that sets no limit (corrected by its usage)."""
MAX_PENDING: Final = 100_000
"""Estimates kept for a usage report to correct; the oldest go first (their reports are lost)."""


class _Limits(msgspec.Struct):
    max_tokens: Any = None
    max_completion_tokens: Any = None


_limits_decoder: Final = msgspec.json.Decoder(_Limits)


@dataclass(frozen=True)
class Estimate:
    """What a request is charged at dispatch."""

    prompt_tokens: int
    completion_tokens: int


def estimate(request: RunInference) -> Estimate:
    """Estimate a request's tokens: its body's length / 4 for the prompt, its max_tokens after.

    The body's JSON framing counts as prompt too; it is small next to the prompts that matter
    here (long ones), and the usage report corrects it.
    """
    prompt = max(1, len(request.body) // CHARS_PER_TOKEN)
    try:
        limits = _limits_decoder.decode(request.body)
    except msgspec.DecodeError:
        return Estimate(prompt, DEFAULT_MAX_TOKENS)
    for value in (limits.max_completion_tokens, limits.max_tokens):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return Estimate(prompt, value)
    return Estimate(prompt, DEFAULT_MAX_TOKENS)


@dataclass
class VirtualTokenCounter:
    """Per-user service counters and the estimates charged that usage has not corrected yet."""

    prompt_weight: float = 1.0
    """Weight of a prompt token against a completion token (prefill is cheaper per token)."""
    counters: dict[str, float] = field(default_factory=dict)
    _pending: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Return the service `prompt_tokens` in and `completion_tokens` out are worth."""
        return self.prompt_weight * prompt_tokens + completion_tokens

    def counter(self, user: str) -> float:
        """Return `user`'s counter (0 for a user never served)."""
        return self.counters.get(user, 0.0)

    def arrive(self, user: str, waiting: Iterable[str]) -> None:
        """Lift `user`, who had nothing waiting and now has, to the least counter of `waiting`
        (the other users with work waiting); a user already above it keeps its counter."""
        others = [self.counter(u) for u in waiting if u != user]
        if others:
            self.counters[user] = max(self.counter(user), min(others))

    def pick(self, users: Iterable[str]) -> str | None:
        """Return, among `users` (those with work that can go now), the least served one;
        ties go to the smallest user id, so that the choice is reproducible."""
        return min(users, key=lambda u: (self.counter(u), u), default=None)

    def charge(self, request_id: str, user: str, guess: Estimate) -> None:
        """Charge `user` for a request dispatched now, from `guess`, until its usage arrives."""
        cost = self.cost(guess.prompt_tokens, guess.completion_tokens)
        self.counters[user] = self.counter(user) + cost
        self._pending[request_id] = (user, cost)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def correct(self, request_id: str, prompt_tokens: int, completion_tokens: int) -> bool:
        """Replace a charged estimate by the request's real usage; tell whether it was ours."""
        charged = self._pending.pop(request_id, None)
        if charged is None:
            return False
        user, cost = charged
        served = self.cost(prompt_tokens, completion_tokens)
        self.counters[user] = self.counter(user) + served - cost
        return True

    def forget(self, request_id: str) -> None:
        """Undo the charge of a request that was not dispatched after all (publish failed)."""
        charged = self._pending.pop(request_id, None)
        if charged is not None:
            user, cost = charged
            self.counters[user] = self.counter(user) - cost
