"""``chunk_numel``: the element-wise work of a step run over consecutive runs of leaves gives the
same bits as the whole group at once, for every rule, donated or not, with None gradients, and
with group-wide decisions (a synced buffer's admission) still made once per step.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import memopt_func
from memopt_func import rules
from memopt_func._rule import _parts
from helpers import RULE_VARIANTS, assert_trees_bitwise_equal, clone_tree, make_rule

VARIANTS = list(RULE_VARIANTS) + ["Adam_C-kappa0", "SGD_C-buffer"]
EXTRA = {
    "Adam_C-kappa0": ("Adam_C", dict(lr=1e-2, kappa=0.0)),
    "SGD_C-buffer": ("SGD_C", dict(lr=1e-2, topC=2, aggr="buffer", critical_test=0.5, synced=False)),
}


def _rule(variant):
    if variant in EXTRA:
        name, kwargs = EXTRA[variant]
        return rules.RULES[name](**kwargs)
    return make_rule(variant)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2), (1,), (), (5, 2)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


def _grads(params, k, missing=()):
    gen = torch.Generator().manual_seed(100 + k)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    return [None if i in missing else g for i, g in enumerate(grads)]


def _run(rule, chunk_numel, donate, steps=7):
    params = _params()
    state = rule.init(params)
    history = []
    for k in range(steps):
        missing = (1, 4) if k == 3 else ()  # one step with None gradients, mid-run
        grads = _grads(params, k, missing)
        if donate:
            params, state = rule.step(params, grads, state, donate=True, chunk_numel=chunk_numel, lr=0.01 + 0.001 * k)
        else:
            params, state = rule.step(params, grads, state, chunk_numel=chunk_numel, lr=0.01 + 0.001 * k)
        history.append(clone_tree((params, state)))
    return history


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("chunk_numel", [1, 9, 20])
@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_step_is_bit_identical_to_the_whole_group(variant, chunk_numel, donate):
    rule = _rule(variant)
    whole = _run(rule, None, donate)
    chunked = _run(rule, chunk_numel, donate)
    for k, (a, b) in enumerate(zip(whole, chunked)):
        assert_trees_bitwise_equal(b, a, f"step {k + 1} with chunk_numel={chunk_numel}")


def test_chunked_step_does_not_mutate_its_inputs():
    rule = rules.Adam_CM(lr=1e-2, topC=2)
    params = _params()
    state = rule.init(params)
    for k in range(4):
        grads = _grads(params, k)
        before = clone_tree((params, grads, state))
        new = rule.step(params, grads, state, chunk_numel=5)
        assert_trees_bitwise_equal((params, grads, state), before, f"inputs of step {k + 1}")
        params, state = new


def test_a_synced_buffer_admits_once_per_step_however_the_leaves_are_chunked():
    rule = rules.Adam_C(lr=1e-2, topC=2)
    params = _params()
    state = rule.init(params)
    for k in range(5):
        params, state = rule.step(params, _grads(params, k), state, chunk_numel=1)
    assert state.critical.offers.tolist() == [5]
    assert state.critical.count.tolist() == [2]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_invalid_chunk_numel_raises_naming_it(bad):
    rule = rules.Adam(lr=1e-2)
    params = _params()
    with pytest.raises(ValueError, match="chunk_numel"):
        rule.step(params, _grads(params, 0, missing=range(6)), rule.init(params), chunk_numel=bad)


def test_parts_are_consecutive_runs_of_at_least_chunk_numel_elements():
    assert _parts([4, 4, 4, 4, 1], None) == [[0, 1, 2, 3, 4]]
    assert _parts([4, 4, 4, 4, 1], 8) == [[0, 1], [2, 3], [4]]
    assert _parts([10, 1, 1], 5) == [[0], [1, 2]]
    assert _parts([3, 3], 1) == [[0], [1]]


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"])
def test_drop_in_cpu_chunking_changes_no_bit(name):
    """The drop-ins chunk on a CPU by default (``cpu_chunk_numel``); a tiny chunk equals none."""

    def run(chunk):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
        opt = getattr(memopt_func, name)(model.parameters(), lr=1e-2)
        opt.cpu_chunk_numel = chunk
        x = torch.randn(16, 6, dtype=torch.float64)
        for _ in range(6):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], pytree.tree_leaves(opt.state_dict()["state"])

    assert_trees_bitwise_equal(run(4), run(None), f"{name} with cpu_chunk_numel=4")
