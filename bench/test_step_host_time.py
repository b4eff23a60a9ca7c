"""bench/step_host_time.py runs on CPU at a tiny size (its timing is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_host_time_prints_one_line_per_cell():
    cmd = [sys.executable, str(ROOT / "bench" / "step_host_time.py"), "--device", "cpu", "--rules", "AdEMAMix",
           "--sizes", "2x500", "--steps", "3", "--label", "here"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["tree"] == "here" and rows[0]["size"] == "2x500"
    assert 0 < rows[0]["host_ms"] <= rows[0]["ms"]
