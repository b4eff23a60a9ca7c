"""bench/vector_width.py's code path at a tiny size (no timing is asserted)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import vector_width  # noqa: E402


def test_a_width_runs_the_baseline_a_drop_in_and_a_stepper_in_a_fresh_process():
    drop_in = vector_width.run_width(None, 2, 64, {"AdamW": vector_width.ADAMW, "SGD_C": vector_width.DROP_INS["SGD_C"]}, False)
    assert set(drop_in) == {"AdamW", "SGD_C"} and all(ms > 0 for ms in drop_in.values())
    stepper = vector_width.run_width(None, 2, 64, {"Stepper(AdamW)": vector_width.STEPPERS["Stepper(AdamW)"]}, True)
    assert stepper["Stepper(AdamW)"] > 0


def test_plain_march_runs_every_cell_in_a_second_process(monkeypatch):
    calls = []

    def fake(simdlen, n, size, cells, stepper, env=None):
        calls.append((simdlen, sorted(cells), env))
        return {k: 1.0 for k in cells}

    monkeypatch.setattr(vector_width, "run_width", fake)
    assert vector_width.main(["--size", "2x64", "--plain-march"]) == 0
    assert calls[1] == (None, sorted(["AdamW", *vector_width.DROP_INS]), {"TORCHINDUCTOR_CPP_MARCH": "native"})
    calls.clear()
    assert vector_width.main(["--size", "2x64", "--simdlen", "256"]) == 0
    assert calls[1] == (256, sorted(vector_width.DROP_INS), None)
