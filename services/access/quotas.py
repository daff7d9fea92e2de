"""Rate limits and token budgets, counted in Redis so that they hold across gateway replicas.

Counters live in fixed UTC windows (minute, day, month) under `names.quota_key`, per user and
per group (a shared allocation). At admission one Lua script, atomically: refuses if any token
counter has reached its limit or any request counter would pass its limit, else counts the
request in every request counter. Tokens are charged afterwards, by the accounting service,
from each request's usage event (once, when its ledger row is written) — so a stream cut by a
disconnect is charged exactly what it delivered, and a request that would cross a token limit
runs, but the next one waits.

Deciding which counters apply (`plan`) is pure; `Quotas.admit` is the one round trip.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from schemas import names
from services.access.errors import ApiError, QuotaExceeded, RateLimited
from services.access.principal import Principal
from services.access.settings import AccessSettings, Limits

ADMIT_SCRIPT = """
for i, key in ipairs(KEYS) do
  local kind, limit = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local used = tonumber(redis.call('GET', key) or '0')
  if (kind == 'r' and used + 1 > limit) or (kind == 't' and used >= limit) then
    return {i, used}
  end
end
for i, key in ipairs(KEYS) do
  if ARGV[2 * i - 1] == 'r' then
    redis.call('INCR', key)
    redis.call('EXPIRE', key, ARGV[#ARGV])
  end
end
return {0, 0}
"""


@dataclass(frozen=True)
class Check:
    """One limit that applies to a request."""

    key: str
    counter: names.QuotaCounter
    period: names.QuotaPeriod
    limit: int
    scope: names.QuotaScope
    subject: str

    def describe(self) -> str:
        per = {"minute": "per minute", "day": "per day", "month": "per month"}[self.period]
        who = "your user" if self.scope == "user" else f"group {self.subject}"
        return f"{self.counter} {per} for {who}"


def seconds_left(period: names.QuotaPeriod, now: float) -> int:
    """Return the whole seconds until the window of `now` ends (at least 1)."""
    if period == "minute":
        end = (now // 60 + 1) * 60
    else:
        t = time.gmtime(now)
        if period == "day":
            end = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400
        else:
            year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
            end = calendar.timegm((year, month, 1, 0, 0, 0))
    return max(1, int(end - now + 0.999))


def _checks_of(limits: Limits, scope: names.QuotaScope, subject: str, now: float) -> list[Check]:
    wanted: list[tuple[names.QuotaCounter, names.QuotaPeriod, int | None]] = [
        ("requests", "minute", limits.requests_per_minute),
        ("tokens", "minute", limits.tokens_per_minute),
        ("tokens", "day", limits.tokens_per_day),
        ("tokens", "month", limits.tokens_per_month),
    ]
    return [
        Check(
            key=names.quota_key(counter, scope, subject, period, now),
            counter=counter,
            period=period,
            limit=limit,
            scope=scope,
            subject=subject,
        )
        for counter, period, limit in wanted
        if limit is not None
    ]


def plan(principal: Principal, settings: AccessSettings, now: float) -> list[Check]:
    """Return every limit that applies to one request of `principal` (pure)."""
    own = settings.user_limit_overrides.get(principal.user_id, settings.user_limits)
    checks = _checks_of(own, "user", principal.user_id, now)
    for group in principal.groups:
        if group in settings.group_limits:
            checks += _checks_of(settings.group_limits[group], "group", group, now)
    return checks


def refusal(check: Check, used: int, now: float) -> ApiError:
    """Return the 429 for a limit that refused a request."""
    wait_s = seconds_left(check.period, now)
    message = (
        f"Limit reached: {check.describe()} is {check.limit} and {used} are used. "
        f"Try again in {wait_s} s."
    )
    headers = {
        "retry-after": str(wait_s),
        f"x-ratelimit-limit-{check.counter}": str(check.limit),
        f"x-ratelimit-remaining-{check.counter}": "0",
    }
    if check.counter == "tokens" and check.period != "minute":
        return QuotaExceeded(message, code="insufficient_quota", headers=headers)
    return RateLimited(message, code="rate_limit_exceeded", headers=headers)


class Quotas:
    """Admission against the counters (one EVALSHA per request when any limit applies)."""

    def __init__(self, redis: Redis, settings: AccessSettings) -> None:
        self._settings = settings
        self._redis = redis
        self._script = redis.register_script(ADMIT_SCRIPT)

    async def admit(self, principal: Principal) -> None:
        """Count the request, or raise RateLimited / QuotaExceeded (429) and count nothing."""
        now = time.time()
        checks = plan(principal, self._settings, now)
        if not checks:
            return
        args: list[str | int] = []
        for check in checks:
            args += ["r" if check.counter == "requests" else "t", check.limit]
        args.append(names.QUOTA_TTL_S["minute"])
        index, used = await self._script(keys=[c.key for c in checks], args=args)
        if index:
            raise refusal(checks[int(index) - 1], int(used), now)

    async def status(self, principal: Principal) -> list[dict[str, object]]:
        """Return every limit that applies to `principal`, with what is used and what is left."""
        now = time.time()
        checks = plan(principal, self._settings, now)
        if not checks:
            return []
        values = await self._redis.mget([c.key for c in checks])
        out: list[dict[str, object]] = []
        for check, value in zip(checks, values, strict=True):
            used = int(value or 0)
            out.append(
                {
                    "limit_name": check.describe(),
                    "counter": check.counter,
                    "period": check.period,
                    "scope": check.scope,
                    "subject": check.subject,
                    "limit": check.limit,
                    "used": used,
                    "remaining": max(0, check.limit - used),
                    "resets_in_s": seconds_left(check.period, now),
                }
            )
        return out
