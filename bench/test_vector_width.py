"""bench/vector_width.py's code path at a tiny size (no timing is asserted)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import vector_width  # noqa: E402


def test_a_width_runs_the_baseline_a_drop_in_and_a_stepper_in_a_fresh_process():
    drop_in = vector_width.run_width(None, 2, 64, {"AdamW": "AdamW", "SGD_C": vector_width.DROP_INS["SGD_C"]}, False)
    assert set(drop_in) == {"AdamW", "SGD_C"} and all(ms > 0 for ms in drop_in.values())
    stepper = vector_width.run_width(None, 2, 64, {"Stepper(AdamW)": vector_width.STEPPERS["Stepper(AdamW)"]}, True)
    assert stepper["Stepper(AdamW)"] > 0
