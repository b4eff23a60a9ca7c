"""Kernel launches of an eager step, counted on the ``meta`` device (bench/launches.py; SPEC.md,
"Launches"): the counter sees a foreach AdamW step as the same few launches whatever the tensor
count, and no drop-in's count may grow past what it is today. Each cell is counted at 20 and 40
tensors and read as ``launches = fixed + per_tensor * tensors``.

Today only AdEMAMix with float32 state launches a fixed number; the critical rules and narrow
state still launch per tensor (issue 28 asks for a fixed number everywhere, at most 45 at 200
tensors). ``CEILING`` holds today's (fixed, per tensor): lower it as the launches come down, never
raise it.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import launches  # noqa: E402

CEILING = {
    "AdEMAMix": (26, 0),
    "Adam_CM": (77, 13),
    "Adam_C": (72, 11),
    "SGD_C": (54, 11),
    "RMSprop_C": (58, 12),
    "Adam_C, synced=False": (67, 11),
    "AdEMAMix, bf16 state": (26, 129),
    "Adam_CM, bf16 state and buffer": (77, 100),
    "AdEMAMix, int8 state": (26, 205),
    "Adam_CM, int8 state and buffer": (77, 254),
}


def _fit(label: str) -> tuple[int, int]:
    make, numel, device = launches.CELLS[label]
    a, b = (launches.count_step(make, n, numel, device).count for n in (20, 40))
    per_tensor, rest = divmod(b - a, 20)
    assert rest == 0, f"{label}: {a} launches at 20 tensors, {b} at 40: not linear in the tensor count"
    return a - 20 * per_tensor, per_tensor


def test_a_foreach_adamw_step_is_eight_launches_whatever_the_tensor_count():
    make, numel, device = launches.CELLS["torch.optim.AdamW(foreach=True)"]
    assert [launches.count_step(make, n, numel, device).count for n in (3, 20, 40)] == [8, 8, 8]


def test_the_counter_leaves_out_views_allocations_and_host_work():
    counter = launches.OpCounter("meta")
    x, host = torch.empty(4, device="meta"), torch.ones(2)
    with counter:
        x.view(2, 2).add_(1)  # a view, then one launch
        host.sum().item()  # host tensors only: no launch
        torch.empty(3, device="meta")  # an allocation: no launch
        torch.zeros(3, device="meta")  # a fill: one launch
        host.to("meta")  # a copy to the device: one launch
    assert counter.count == 3 and set(counter.names) == {"add_", "zeros", "_to_copy"}, counter.names


@pytest.mark.parametrize("label", list(CEILING))
def test_an_eager_step_launches_no_more_than_today(label):
    fixed, per_tensor = _fit(label)
    ceiling = CEILING[label]
    assert per_tensor <= ceiling[1] and fixed + 200 * per_tensor <= ceiling[0] + 200 * ceiling[1], (
        f"{label}: {fixed} + {per_tensor} per tensor launches, more than today's {ceiling[0]} + {ceiling[1]} per tensor"
    )
