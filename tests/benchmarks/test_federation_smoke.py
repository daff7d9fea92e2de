"""Smoke test of benchmarks/federation.py: all three policies run, report, and lose nothing.

It asserts no speed and no ratio: a handful of requests says nothing about policies. The
site TTL is shortened (`--site-ttl-s`) so that the killed site's work moves within seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "federation.py"
KEYS = {"goodput_rps", "ttft_p50_ms", "ttft_p99_ms", "lost", "errors"}


def test_tiny_run_reports_every_policy_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "federation.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "6", "--site-ttl-s", "2", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())

    assert set(result["policies"]) == {"first", "round_robin", "random"}
    for policy, numbers in result["policies"].items():
        assert numbers.keys() >= KEYS, policy
        assert all(isinstance(numbers[k], int | float) for k in KEYS), (policy, numbers)
        assert numbers["requests"] == 6
        assert numbers["lost"] == 0, (policy, proc.stdout[-3000:])
