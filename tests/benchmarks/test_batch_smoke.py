"""Smoke test of benchmarks/batch.py: all three scenarios run, report their ratios, lose nothing.

It asserts no speed and no ratio: a 40-line batch says nothing about the goals (fixed costs
dominate it). It checks that every line of the batch alone completed, that every interactive
request completed in both phases, and that both users were served in the fair-share window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "batch.py"
RATIOS = ("batch_time_ratio", "interactive_p99_ratio", "token_share_ratio")


def test_tiny_run_reports_the_three_ratios_and_completes_every_request(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--lines", "40", "--interactive", "6", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    for key in RATIOS:
        assert isinstance(result[key], float), (key, result[key])
        assert result[key] > 0, key
    alone = result["batch_alone"]
    assert (alone["status"], alone["completed"], alone["failed"]) == ("completed", 40, 0)
    for phase in ("alone", "with_batch"):
        assert result["interactive"][phase]["completed"] == 6, result["interactive"]
    assert result["interactive"]["batch_status"] in ("cancelled", "completed")  # 40 lines: either
    assert all(v > 0 for v in result["fair_share"]["tokens"].values()), result["fair_share"]
    assert "(a) batch alone" in proc.stdout
