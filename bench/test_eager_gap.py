"""bench/eager_gap.py's code paths at tiny sizes (no timing is asserted)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import eager_gap  # noqa: E402
from cells import run_cell  # noqa: E402


def test_drift_the_rules_sum_holds_the_bound_a_float32_running_sum_does_not():
    worst = eager_gap.drift(steps=1500, numel=64, every=[0, 1], jumps=True)
    assert worst["rule"] <= 1.0  # SPEC's invariant, as the property states it
    assert worst[1] <= 1.0  # re-summed at every step: the bound holds
    assert worst[0] > 100.0  # never re-summed: the evicted values' rounding stays in the sum


def test_time_cells_run_each_variant_in_a_fresh_process():
    # the float32 variant's cell asserts that its patch took effect (buf_sum is float32 there)
    from memopt_func import _slot_write
    from memopt_func import critical_buffer as cb

    before = cb.init, _slot_write._move_sums
    for impl in eager_gap.IMPLS:
        assert run_cell(eager_gap.step_cell, impl, "SGD_C", 3, 50, steps=2) > 0
    assert (cb.init, _slot_write._move_sums) == before  # patched in the cell's process only
    loops = eager_gap.per_tensor_loops(3, 50, repeats=2)
    assert len(loops) == 3 and all(ms > 0 for ms in loops.values())


def test_a_runs_cell_steps_with_the_chunk_it_is_given():
    one = run_cell(eager_gap.step_cell, "ours", "Adam_C", 3, 16, steps=2, chunk=16)
    assert one > 0
