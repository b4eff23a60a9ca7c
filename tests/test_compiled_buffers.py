"""How a compiled Stepper keeps the critical buffer: SPEC's ``[C, *shape]`` layout, written in place.

On a CPU the step reads the chosen slot's index on the host (``critical_buffer.slot_on_host``;
the Stepper traces ``Tensor.item()`` into its graph), so the row is a view that one loop reads
and writes: the running ``buf_sum`` update, and the offered value where admitted, the row's own
value elsewhere. Off the host (an accelerator, where reading the index would sync) a per-tensor
step gathers row ``s`` and writes it back with a value that depends on the read, so Inductor
keeps the read first and writes in place (a read that nothing written depends on may be moved
after the write by Inductor's locality pass, and then the whole buffer is copied to a temporary
every step, 3x slower at 20 x 1M); a flat leaf writes refused elements to a sink row after the
slots, reading nothing first. The accelerator forms run here with the host read switched off.
These tests look at the compiled code's allocations, so such a copy fails them whatever the
machine's speed.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from memopt_func import rules
from memopt_func.compiled import Stepper
from memopt_func.compiled import stepper as stepper_module

SIZES = [(40, 25), (1000,), (37,)]


def _params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SIZES]


def _set_grads(params: list[torch.Tensor], k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    # shrinking gradients: once the buffer is full, offers are refused as well as admitted
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) / (k + 1) ** 2


@pytest.mark.parametrize("host", [True, False], ids=["cpu", "accelerator-form"])
def test_stepper_state_shows_the_rule_layout(host, monkeypatch):
    if not host:
        monkeypatch.setattr(stepper_module, "_slots_on_host", lambda device: False)
    stepper = Stepper(rules.Adam_C(lr=1e-2, topC=2), _params(0), compile=False)
    assert [tuple(b.shape) for b in stepper.state.critical.buf] == [(2, 1037 + 1000)]
    rows = 2 if host else 3  # off the host, a sink row after the slots
    assert [tuple(b.shape) for b in stepper._step_state.critical.buf] == [(rows, 1037 + 1000)]
    per_tensor = stepper.per_tensor_state().critical.buf
    assert sorted(tuple(b.shape) for b in per_tensor) == sorted([(2, 40, 25), (2, 1000), (2, 37)])


@pytest.mark.parametrize("host", [True, False], ids=["cpu", "accelerator-form"])
@pytest.mark.parametrize(
    "name, hyper, flat",
    [
        ("Adam_CM", dict(lr=1e-2, topC=3, decay=0.95), True),
        ("Adam_C", dict(lr=1e-2, topC=3, decay=0.95, synced=False), False),
    ],
    ids=["flat-Adam_CM", "per-tensor-Adam_C"],
)
def test_compiled_step_updates_the_buffer_in_place_and_equals_eager(name, hyper, flat, host, monkeypatch):
    if not host:
        monkeypatch.setattr(stepper_module, "_slots_on_host", lambda device: False)
    rule = getattr(rules, name)(**hyper)
    params, eager_params = _params(0), [p.detach().clone() for p in _params(0)]
    stepper = Stepper(rule, params, flat=flat)
    assert stepper.flat == flat
    eager_state = rule.init(eager_params)
    codes = []
    for k in range(8):
        if flat and not host:  # a flat leaf's sink row (refused elements) is never read: NaN there changes nothing
            for b in stepper._step_state.critical.buf:
                assert b.shape[0] == hyper["topC"] + 1
                b[-1].fill_(float("nan"))
        _set_grads(params, k)
        grads = [p.grad.clone() for p in params]
        if k == 0:
            codes = run_and_get_code(stepper.step)[1]
        else:
            stepper.step()
        eager_params, eager_state = rule.step(eager_params, grads, eager_state)
    # a copy of a buffer (any number of rows) is larger than the largest stepped leaf; the step's
    # element-wise temporaries are not
    largest = max(t.numel() for t in (stepper._step_params if flat else params))
    allocated = [
        shape
        for shape in re.findall(r"empty_strided_cpu\(\(([^)]*)\)", "\n".join(codes))
        if math.prod(int(d) for d in re.findall(r"\d+", shape)) > largest
    ]
    assert codes and not allocated, (
        f"the compiled step allocates buffer-sized temporaries {allocated} (largest leaf: {largest} elements)"
    )
    # the host form reads the slot index in the graph's wrapper; the accelerator form never does
    assert (".item()" in "\n".join(codes)) == host
    crit = eager_state.critical
    offers, accepted = int(crit.offers.sum()), int(crit.accepted.sum())
    assert 0 < accepted < offers, f"the run should both admit and refuse (admitted {accepted} of {offers})"
    for got, want in zip(stepper.params, eager_params):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    got_crit = stepper.per_tensor_state().critical
    for got, want in zip(got_crit.buf_sum, crit.buf_sum):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-7)
