"""The GPU check's dry run: the same code path as on a CUDA machine, on CPU at tiny sizes, so
that the first GPU run works the first time (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["info"]["dry_run"] and set(data["checks"]["replay"]) == {"Adam_CM", "Adam_C", "AdEMAMix", "SGD_C"}
    assert {"torch AdamW fused", "torch AdamW foreach", "torch AdamW compiled", "compiled.Adam_CM", "eager Adam_CM",
            "eager AdEMAMix int8", "eager Adam_CM int8 (state and buffer)"} <= set(data["table"])
    assert "| compiled.Adam_CM |" in (tmp_path / "RESULTS-gpu.md").read_text()


def test_gpu_check_without_cuda_asks_for_the_dry_run():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
