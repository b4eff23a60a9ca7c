"""A step is all or nothing: an invalid item anywhere in any param group raises before any group
is updated, leaving every parameter and all optimizer state exactly as they were (eager and
compiled drop-ins)."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from memopt_func import compiled, optim

NAMES = ("Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix")
FAULTS = ("negative lr", "decay above 1", "sparse gradient", "lr tensor of two elements")


def _plant(opt, group: int, fault: str, name: str) -> None:
    g = opt.param_groups[group]
    if fault == "negative lr":
        g["lr"] = -1.0
    elif fault == "decay above 1":
        if "decay" in g:
            g["decay"] = 1.5
        else:
            g["eps"] = -1.0
    elif fault == "sparse gradient":
        p = g["params"][-1]
        p.grad = p.grad.to_sparse()
    else:
        g["lr"] = torch.tensor([1e-3, 2e-3])


@given(
    name=st.sampled_from(NAMES),
    sizes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1, max_size=4),
    data=st.data(),
    warm=st.integers(0, 2),
    fault=st.sampled_from(FAULTS),
)
def test_invariant_an_invalid_item_changes_nothing(name, sizes, data, warm, fault):
    gen = torch.Generator().manual_seed(len(sizes))
    params = [[nn.Parameter(torch.randn(n, 3, generator=gen, dtype=torch.float64)) for n in group] for group in sizes]
    opt = getattr(optim, name)([{"params": ps} for ps in params], lr=1e-2)
    for _ in range(warm):  # some groups may already have state
        for ps in params:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    for ps in params:
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    bad_group = data.draw(st.integers(0, len(sizes) - 1))
    _plant(opt, bad_group, fault, name)
    before_params = [p.detach().clone() for ps in params for p in ps]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    try:
        opt.step()
    except ValueError as e:
        assert f"param group {bad_group}" in str(e), str(e)
    else:
        raise AssertionError(f"{fault} in group {bad_group} was not refused")
    assert all(torch.equal(a, b) for a, b in zip(before_params, (p for ps in params for p in ps)))
    after_state = opt.state_dict()["state"]
    assert before_state.keys() == after_state.keys(), "a failing step created or dropped state"
    for k in before_state:
        assert before_state[k].keys() == after_state[k].keys()
        for key in before_state[k]:
            assert torch.equal(before_state[k][key], after_state[k][key]), f"state {k}/{key} changed"


@given(name=st.sampled_from(NAMES), bad_group=st.integers(0, 2), warm=st.booleans())
def test_invariant_an_invalid_item_changes_nothing_compiled(name, bad_group, warm):
    """The compiled drop-ins check every group before any compiled step runs (built uncompiled
    here would not test them: these compile once per example, so few examples)."""
    gen = torch.Generator().manual_seed(bad_group)
    params = [[nn.Parameter(torch.randn(4, 3, generator=gen))] for _ in range(3)]
    opt = getattr(compiled, name)([{"params": ps} for ps in params], lr=1e-2)
    for _ in range(int(warm)):
        for ps in params:
            ps[0].grad = torch.randn(4, 3, generator=gen)
        opt.step()
    for ps in params:
        ps[0].grad = torch.randn(4, 3, generator=gen)
    opt.param_groups[bad_group]["lr"] = -1.0
    before = [ps[0].detach().clone() for ps in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    try:
        opt.step()
    except ValueError as e:
        assert f"param group {bad_group}" in str(e)
    else:
        raise AssertionError("a negative lr was not refused")
    assert all(torch.equal(a, ps[0]) for a, ps in zip(before, params))
    after = opt.state_dict()["state"]
    assert before_state.keys() == after.keys()
    assert all(torch.equal(before_state[k][x], after[k][x]) for k in before_state for x in before_state[k])
