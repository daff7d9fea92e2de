"""Smoke test of benchmarks/overhead.py: it runs, reports every number, and nothing fails.

It asserts no speed: speed is measured by the benchmark itself, not by timed tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "overhead.py"


def _numbers(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_quick_run_reports_every_number(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())

    assert set(result) == {
        "floors", "ttft_added_ms", "itl_added_ms", "rps_direct", "rps_gateway",
        "relay_chunks_per_s", "requests", "errors",
    }  # fmt: skip
    assert set(result["floors"]) == {"fastapi_rps", "confirm_rtt_ms", "xread_wake_ms"}
    assert set(result["ttft_added_ms"]) == {"c1", "c16"}
    leaves = [
        *result["floors"].values(),
        *(result["ttft_added_ms"][load][q] for load in ("c1", "c16") for q in ("p50", "p99")),
        result["itl_added_ms"]["p50"],
        result["itl_added_ms"]["p99"],
        result["rps_direct"],
        result["rps_gateway"],
        result["relay_chunks_per_s"],
        result["requests"],
        result["errors"],
    ]
    assert all(_numbers(v) for v in leaves), result
    assert result["requests"] > 0
    assert result["errors"] == 0, proc.stdout[-3000:]
