#!/usr/bin/env python
"""Issue 6's batch benchmark: a batch fills the sites, interactive work does not suffer, users
share by tokens.

The real gateway, batch worker, router, accounting and two real site agents, each over one
`first sim-vllm` with 8 slots at 50 tok/s per request (fixed: 800 tok/s in all); every answer
is 64 tokens (the simulator never stops early); seed 7 picks the prompts' words. One stack
runs three scenarios in order:

  (a) batch alone: a `--lines` batch (default 10,000) of short prompts, from batches.create to
      `completed`, against the ideal: total tokens / total capacity = lines x 64 / 800 s.
      Goal <= 1.10 x.
  (b) interactive next to a batch: a second user streams `--interactive` requests (default
      300) at a steady 2 per second, first alone, then again while a batch as big as (a)'s runs
      (created as the stream starts; cancelled when it ends, to bound the run). Goal: TTFT
      p99 with the batch <= 1.2 x without. The stream keeps the router's interactive reserve
      in force: what a quiet spell costs (the first request after it may wait for one batch
      line's run, ~1.3 s, because a batch alone is lent the reserve) is not in this figure.
  (c) fair share: two users submit batches at once, one with ~1,000-token prompts, one with
      ~16-token prompts (the report gives the simulator's count of each); tokens served to
      each (prompt x the router's prompt_token_weight, 1.0, + completion, from the ledger)
      while both are backlogged (from 10 % to 80 % of the short batch done). Goal: the smaller share
      within 10 % of the larger (ratio >= 0.90).

    .venv/bin/python benchmarks/batch.py [--lines 10000] [--interactive 300] [--json FILE]

It starts a RabbitMQ node of its own (`--shared-rabbit`: a vhost on the loopback RabbitMQ)
and needs rabbitmq-server and redis-server: `scripts/test` installs both. At the default
size it runs about 25 minutes, most of it (a)'s 800-s ideal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks.federation import FederationStack, Sims, Site  # noqa: E402
from benchmarks.overhead import Client, fmt, pct, run_benchmark, wait_gateway  # noqa: E402
from services.access import apikeys  # noqa: E402
from services.devstack.client import Outcome, stream  # noqa: E402
from services.sim_vllm.parsing import CHAT_OVERHEAD, MESSAGE_OVERHEAD  # noqa: E402
from tests.faults.privates import PrivateRabbit  # noqa: E402

MODEL: Final = "sim"
SITES: Final = (Site("A", 8, 50.0), Site("B", 8, 50.0))
CAPACITY_TOK_S: Final = sum(s.slots * s.tokens_per_s for s in SITES)
OUTPUT_TOKENS: Final = 64
SHORT_PROMPT: Final = 16
LONG_PROMPT: Final = 1000
CHAT_TOKENS: Final = CHAT_OVERHEAD + MESSAGE_OVERHEAD
INTERACTIVE_RPS: Final = 2.0
RESERVE_IDLE_S: Final = 10.0
"""The router's reserve_idle_s here (default 30 s): (a) waits this long after the warm-up
request, so that the batch alone is lent the reserve from its start."""
PROMPT_WEIGHT: Final = 1.0  # the router's prompt_token_weight (its default), set explicitly
ENDED: Final = ("completed", "failed", "expired", "cancelled")
HTTP_TIMEOUT: Final = httpx.Timeout(120.0, connect=10.0)
GOALS: Final = {"batch_time_ratio": 1.10, "interactive_p99_ratio": 1.2, "token_share_ratio": 0.90}
WORDS: Final = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")


def prompt(rng: random.Random, tokens: int) -> str:
    """A prompt the simulator counts as `tokens` tokens in a one-message chat."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, tokens - CHAT_TOKENS)))


def batch_file(rng: random.Random, lines: int, prompt_tokens: int, tag: str) -> bytes:
    out = io.BytesIO()
    for i in range(lines):
        line = {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt(rng, prompt_tokens)}],
                "max_tokens": OUTPUT_TOKENS,
            },
        }
        out.write(json.dumps(line).encode() + b"\n")
    return out.getvalue()


@dataclass
class User:
    """One user of the scenario: an API key and an HTTP client on the gateway."""

    name: str
    http: httpx.AsyncClient

    async def create_batch(self, data: bytes) -> str:
        files = {"file": (f"{self.name}.jsonl", data)}
        upload = await self.http.post("/v1/files", files=files, data={"purpose": "batch"})
        upload.raise_for_status()
        body = {
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        created = await self.http.post("/v1/batches", json=body)
        created.raise_for_status()
        batch_id: str = created.json()["id"]
        return batch_id

    async def batch(self, batch_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/batches/{batch_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def until_ended(self, batch_id: str, bound_s: float) -> dict[str, Any]:
        """Poll every 0.25 s until the batch ends (or raise after `bound_s`)."""
        deadline = time.monotonic() + bound_s
        while True:
            batch = await self.batch(batch_id)
            if batch["status"] in ENDED:
                return batch
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch {batch_id} still {batch['status']} after {bound_s}s")
            await asyncio.sleep(0.25)

    async def cancel(self, batch_id: str, bound_s: float = 120.0) -> dict[str, Any]:
        """Cancel the batch unless it ended already (a 400 then); wait until it ended."""
        response = await self.http.post(f"/v1/batches/{batch_id}/cancel")
        if response.status_code != 400:
            response.raise_for_status()
        return await self.until_ended(batch_id, bound_s)


async def make_user(stack: FederationStack, name: str) -> User:
    key = await apikeys.issue_key(f"sqlite+aiosqlite:///{stack.database}", name)
    http = httpx.AsyncClient(
        base_url=stack.gateway_url,
        headers={"authorization": f"Bearer {key}"},
        timeout=HTTP_TIMEOUT,
        trust_env=False,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )
    return User(name, http)


# ---------------------------------------------------------------- the scenarios


async def batch_alone(user: User, data: bytes, lines: int) -> dict[str, Any]:
    ideal_s = lines * OUTPUT_TOKENS / CAPACITY_TOK_S
    began = time.perf_counter()
    batch_id = await user.create_batch(data)
    batch = await user.until_ended(batch_id, max(120.0, 5 * ideal_s))
    took_s = time.perf_counter() - began
    counts = batch["request_counts"]
    return {
        "lines": lines,
        "status": batch["status"],
        "completed": counts["completed"],
        "failed": counts["failed"],
        "ideal_s": round(ideal_s, 2),
        "took_s": round(took_s, 2),
        "ratio": round(took_s / ideal_s, 4),
    }


async def interactive_stream(user: User, count: int) -> list[Outcome]:
    """`count` streamed requests, one every 1/INTERACTIVE_RPS s (open loop)."""
    rng = random.Random(11)
    t0 = time.perf_counter()

    async def one(i: int) -> Outcome:
        await asyncio.sleep(max(0.0, t0 + i / INTERACTIVE_RPS - time.perf_counter()))
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt(rng, SHORT_PROMPT)}],
            "max_tokens": OUTPUT_TOKENS,
            "stream": True,
        }
        return await stream(user.http, "/v1/chat/completions", body, {})

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def ttft_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    ttfts = [o.ttft * 1000 for o in outcomes if o.completed and o.ttft is not None]
    return {
        "requests": len(outcomes),
        "completed": len(ttfts),
        "ttft_p50_ms": round(pct(ttfts, 50), 2) if ttfts else None,
        "ttft_p99_ms": round(pct(ttfts, 99), 2) if ttfts else None,
        "ttft_max_ms": round(max(ttfts), 2) if ttfts else None,
    }


async def interactive_with_batch(
    user: User, batcher: User, data: bytes, count: int
) -> dict[str, Any]:
    alone = ttft_summary(await interactive_stream(user, count))
    batch_id = await batcher.create_batch(data)
    outcomes, _ = await asyncio.gather(interactive_stream(user, count), asyncio.sleep(0))
    during = await batcher.batch(batch_id)
    cancelled = await batcher.cancel(batch_id)
    with_batch = ttft_summary(outcomes)
    ratio = (
        with_batch["ttft_p99_ms"] / alone["ttft_p99_ms"]
        if with_batch["ttft_p99_ms"] and alone["ttft_p99_ms"]
        else None
    )
    return {
        "alone": alone,
        "with_batch": with_batch,
        "batch_lines_done_meanwhile": during["request_counts"]["completed"],
        "batch_status": cancelled["status"],
        "ratio": None if ratio is None else round(ratio, 4),
    }


def served_tokens(
    database: Path, users: dict[str, str], since: float, until: float
) -> dict[str, float]:
    """Weighted tokens the ledger holds per username, for requests finished in the window."""
    query = (
        "SELECT username, SUM(prompt_tokens), SUM(completion_tokens), COUNT(*) FROM usage_ledger"
        " WHERE finished_at > ? AND finished_at <= ? AND priority = 'batch' GROUP BY username"
    )
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as db:
        rows = {u: (p, c, n) for u, p, c, n in db.execute(query, (since, until)).fetchall()}
    out: dict[str, float] = {}
    for name in users:
        prompt_tokens, completion, served = rows.get(name, (0, 0, 0))
        out[name] = PROMPT_WEIGHT * (prompt_tokens or 0) + (completion or 0)
        out[f"{name}_requests"] = served
        out[f"{name}_prompt_tokens_per_request"] = (prompt_tokens or 0) / max(served, 1)
    return out


async def settle_ledger(database: Path, expected: int, within_s: float = 30.0) -> None:
    """Wait until the ledger holds `expected` batch rows or stopped growing for 3 s."""
    deadline, last, stable = time.monotonic() + within_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as db:
            (n,) = db.execute("SELECT COUNT(*) FROM usage_ledger").fetchone()
        if n != last:
            last, stable = n, time.monotonic()
        if n >= expected or time.monotonic() - stable > 3:
            return
        await asyncio.sleep(0.5)


async def fair_share(
    stack: FederationStack, long_user: User, short_user: User, lines: int, rng: random.Random
) -> dict[str, Any]:
    long_data = batch_file(rng, lines, LONG_PROMPT, "long")
    short_data = batch_file(rng, lines, SHORT_PROMPT, "short")
    ids = await asyncio.gather(
        long_user.create_batch(long_data), short_user.create_batch(short_data)
    )
    users = dict(zip((long_user.name, short_user.name), ids, strict=True))
    # The window: from when the short-prompt batch has 10 % of its lines done to when it has
    # 80 %. Both users are backlogged all through it; the first wave (dispatched before any
    # usage corrected an estimate) and the short batch's tail (when its last lines are out and
    # the long user rightly gets every slot) are outside it.
    bound = time.monotonic() + max(300.0, 4 * lines * OUTPUT_TOKENS / CAPACITY_TOK_S)
    marks: dict[float, float] = {}
    while len(marks) < 2:
        if time.monotonic() > bound:
            raise RuntimeError("the short-prompt batch did not reach 80 % within its bound")
        batch = await short_user.batch(users[short_user.name])
        done = batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
        for mark in (0.1, 0.8):
            if mark not in marks and done >= mark * lines:
                marks[mark] = time.time()
        if batch["status"] in ENDED and len(marks) < 2:
            raise RuntimeError(f"the short-prompt batch ended {batch['status']} early")
        await asyncio.sleep(0.1)
    for name, batch_id in users.items():
        await (long_user if name == long_user.name else short_user).cancel(batch_id)
    await settle_ledger(stack.database, 0, 5)
    served = served_tokens(stack.database, users, marks[0.1], marks[0.8])
    tokens = {name: served[name] for name in users}
    small, large = min(tokens.values()), max(tokens.values())
    total = sum(tokens.values()) or 1.0
    return {
        "window_s": round(marks[0.8] - marks[0.1], 2),
        "tokens": {k: round(v) for k, v in tokens.items()},
        "requests": {name: served[f"{name}_requests"] for name in users},
        "prompt_tokens_per_request": {
            name: round(served[f"{name}_prompt_tokens_per_request"]) for name in users
        },
        "shares": {k: round(v / total, 4) for k, v in tokens.items()},
        "ratio": round(small / large, 4) if large else None,
    }


# ---------------------------------------------------------------- report and main


def report(result: dict[str, Any]) -> None:
    a, b, c = result["batch_alone"], result["interactive"], result["fair_share"]
    rows = [
        (
            "(a) batch alone: time / ideal",
            f"{a['took_s']:.1f} s / {a['ideal_s']:.1f} s ({a['completed']}/{a['lines']} ok)",
            a["ratio"],
            "<= 1.10",
            a["ratio"] <= GOALS["batch_time_ratio"],
        ),
        (
            "(b) interactive TTFT p99 with / without batch",
            f"{fmt(b['with_batch']['ttft_p99_ms'] or 0)} / "
            f"{fmt(b['alone']['ttft_p99_ms'] or 0)} ms",
            b["ratio"],
            "<= 1.2",
            b["ratio"] is not None and b["ratio"] <= GOALS["interactive_p99_ratio"],
        ),
        (
            "(c) token share, smaller / larger",
            " vs ".join(f"{k} {v:.1%}" for k, v in c["shares"].items()),
            c["ratio"],
            ">= 0.90",
            c["ratio"] is not None and c["ratio"] >= GOALS["token_share_ratio"],
        ),
    ]
    w = 118
    print("\n" + "=" * w)
    print(f"  batch benchmark: 2 sites x 8 slots x 50 tok/s, 64-token answers, "
          f"{a['lines']} lines, {b['alone']['requests']} interactive at "
          f"{INTERACTIVE_RPS:g}/s, seed {result['seed']}")  # fmt: skip
    print("-" * w)
    print(f"  {'scenario':48}{'measured':44}{'ratio':>8}  {'goal':>8}  result")
    for label, measured, ratio, goal, met in rows:
        shown = "-" if ratio is None else f"{ratio:.3f}"
        print(f"  {label:48}{measured:44}{shown:>8}  {goal:>8}  {'met' if met else 'MISSED'}")
    print("-" * w)
    print(f"  interactive: p50 {fmt(b['alone']['ttft_p50_ms'] or 0)} -> "
          f"{fmt(b['with_batch']['ttft_p50_ms'] or 0)} ms, max "
          f"{fmt(b['alone']['ttft_max_ms'] or 0)} -> {fmt(b['with_batch']['ttft_max_ms'] or 0)}"
          f" ms; batch lines done meanwhile {b['batch_lines_done_meanwhile']}; "
          f"fair-share window {c['window_s']:.0f} s, prompts "
          + ", ".join(f"{k} {v}" for k, v in c["prompt_tokens_per_request"].items())
          + " tokens, requests "
          + ", ".join(f"{k} {v}" for k, v in c["requests"].items()))  # fmt: skip


async def run(
    lines: int, interactive: int, seed: int, shared_rabbit: bool, scenarios: str
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="first-batch-"))
    sims = Sims(root, SITES)
    node = None if shared_rabbit else PrivateRabbit()
    env = {
        "FIRST_ROUTER_PROMPT_TOKEN_WEIGHT": str(PROMPT_WEIGHT),
        "FIRST_ROUTER_RESERVE_IDLE_S": str(RESERVE_IDLE_S),
        "FIRST_GATEWAY_BATCH_POLL_S": "0.2",
        "FIRST_GATEWAY_BATCH_CANCEL_GRACE_S": "2",
        "FIRST_GATEWAY_BATCH_MAX_FILE_BYTES": str(1024**3),
        "FIRST_GATEWAY_BATCH_MAX_LINES": str(max(50_000, lines)),
    }
    rng = random.Random(seed)
    stack: FederationStack | None = None
    began = time.monotonic()
    try:
        print(f"starting 2 simulators{'' if node is None else ' and a RabbitMQ node'}; logs "
              f"under {root}", flush=True)  # fmt: skip
        sims.start()
        if node is not None:
            node.start()
        workdir = root / "stack"
        workdir.mkdir()
        stack = FederationStack(workdir, sims, "first", env, node, batch_worker=True)
        await stack.start()
        await wait_gateway(Client({"authorization": f"Bearer {stack.api_key}"}), stack)
        batcher, person = await make_user(stack, "batcher"), await make_user(stack, "person")
        long_user, short_user = await make_user(stack, "long"), await make_user(stack, "short")
        data = batch_file(rng, lines, SHORT_PROMPT, "line")
        await asyncio.sleep(RESERVE_IDLE_S + 0.5)  # no interactive request for reserve_idle_s
        alone: dict[str, Any] = {}
        mixed: dict[str, Any] = {}
        shares: dict[str, Any] = {}
        if "a" in scenarios:
            ideal_s = lines * OUTPUT_TOKENS / CAPACITY_TOK_S
            print(f"  (a) {lines} lines alone, ideal {ideal_s:.0f}s", flush=True)
            alone = await batch_alone(batcher, data, lines)
        if "b" in scenarios:
            print(f"  (b) {interactive} interactive requests alone, then with a batch", flush=True)
            mixed = await interactive_with_batch(person, batcher, data, interactive)
        share_lines = max(20, lines // 10)
        if "c" in scenarios:
            print(f"  (c) two users, {share_lines} lines each", flush=True)
            shares = await fair_share(stack, long_user, short_user, share_lines, rng)
        if (dead := stack.dead()) is not None:
            raise RuntimeError(dead)
        for user in (batcher, person, long_user, short_user):
            await user.http.aclose()
    except BaseException:
        print(f"failed; logs kept in {root}", file=sys.stderr)
        root.joinpath("keep").touch()
        raise
    finally:
        if stack is not None:
            stack.stop()
        sims.group.stop_all()
        if node is not None:
            node.remove()
        if not root.joinpath("keep").exists() and not os.environ.get("FIRST_BENCH_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "seed": seed,
        "batch_alone": alone,
        "interactive": mixed,
        "fair_share": shares,
        "batch_time_ratio": alone.get("ratio"),
        "interactive_p99_ratio": mixed.get("ratio"),
        "token_share_ratio": shares.get("ratio"),
    }
    if alone and mixed and shares:
        report(result)
    else:
        print(json.dumps(result, indent=2))
    print(f"\ntotal {time.monotonic() - began:.0f}s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000, help="batch size (default 10000)")
    parser.add_argument(
        "--interactive", type=int, default=300, help="interactive requests per phase (300)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--scenarios",
        default="abc",
        help="which of a, b, c to run (default all; the table needs all three)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--shared-rabbit",
        action="store_true",
        help="a fresh vhost on the RabbitMQ of scripts/test instead of a node of its own",
    )
    args = parser.parse_args()
    if args.lines < 20 or args.interactive < 2:
        parser.error("--lines must be at least 20 and --interactive at least 2")
    run_benchmark(
        run(args.lines, args.interactive, args.seed, args.shared_rabbit, args.scenarios), args.json
    )


if __name__ == "__main__":
    main()
