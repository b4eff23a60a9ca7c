"""``chunk_numel``: the element-wise work of a step run over consecutive runs of leaves gives the
same bits as the whole group at once, for every rule, donated or not, with None gradients, and
with group-wide decisions (a synced buffer's admission) still made once per step.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree

import memopt_func
from memopt_func import rules, schema
from memopt_func._parts import runs as _parts
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


# ---------------------------------------------------------------- scratch and slices of a leaf
def _run_scratch(rule, chunk_numel, scratch, dtype, steps=7):
    """A donated run over float32 (or float64) leaves, some larger than a chunk."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 7), (3,), (50,), (), (2, 3, 4)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    state = rule.init(params)
    history = []
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) * (1 + k % 3) for p in params]
        if k == 3:
            grads[2] = None  # the sliced leaf misses a step
        params, state = rule.step(params, grads, state, donate=True, chunk_numel=chunk_numel, scratch=scratch, lr=0.01 + 0.001 * k)
        history.append(clone_tree((params, state)))
    return history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("chunk_numel", [None, 7, 16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_scratch_and_sliced_leaves_change_no_bit(variant, chunk_numel, dtype):
    """Temporaries from a Scratch (every one, at min_numel=1) and leaves larger than chunk_numel
    run a slice at a time give the bits of the plain donated whole-group step, step after step
    (so nothing a later step reads was left in the scratch)."""
    rule = _rule(variant)
    plain = _run_scratch(rule, None, None, dtype)
    scratch = memopt_func.Scratch(min_numel=1)
    got = _run_scratch(rule, chunk_numel, scratch, dtype)
    for k, (a, b) in enumerate(zip(plain, got)):
        assert_trees_bitwise_equal(b, a, f"{variant} step {k + 1}, chunk_numel={chunk_numel}, scratch")
    if "_C" in variant:  # a critical buffer's step always has temporaries (its aggregate)
        assert scratch.nbytes > 0


def test_a_sliced_leaf_moves_its_counters_and_buffer_once_per_step():
    rule = rules.Adam_C(lr=1e-2, topC=2)
    params = [torch.randn(50), torch.randn(3)]
    state = rule.init(params)
    scratch = memopt_func.Scratch(min_numel=1)
    for k in range(5):
        grads = [torch.randn(50), torch.randn(3)]
        params, state = rule.step(params, grads, state, donate=True, chunk_numel=8, scratch=scratch)
    assert state.step.tolist() == [5.0, 5.0]
    assert state.critical.offers.tolist() == [5] and state.critical.count.tolist() == [2]


class _KeepsItsInput(rules.Rule):
    """An element-wise rule that keeps its gradient input as state (a temporary, when a critical
    buffer's aggregate feeds it): what a step leaves in the scratch must be copied out."""

    ELEMENTWISE = True

    @schema.declare(step=schema.step(), last=schema.leaf())
    class State(NamedTuple):
        step: torch.Tensor
        last: tuple

    def _init(self, leaves):
        return self.State(step=torch.zeros(len(leaves), dtype=torch.float64), last=tuple(torch.zeros_like(p) for p in leaves))

    def _update(self, params, grads, state, idx, h, ctx):
        new = [p.sub_(0.1 * g) if ctx.donate else p - 0.1 * g for p, g in zip(params, grads)]
        last = list(state.last)
        for i, g in zip(idx, grads):
            last[i] = g
        return new, self.State(step=state.step + 1, last=tuple(last))


def test_state_that_is_a_scratch_temporary_is_copied_out():
    rule = rules.with_critical_buffer(_KeepsItsInput(), topC=2)
    scratch = memopt_func.Scratch(min_numel=1)
    outs = []
    for sc in (None, scratch):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(40, generator=gen), torch.randn(5, generator=gen)]
        state = rule.init(params)
        for k in range(4):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            params, state = rule.step(params, grads, state, donate=True, chunk_numel=16, scratch=sc)
            for t in state.base.last:
                assert not scratch.holds(t)
        outs.append((params, state))
    assert_trees_bitwise_equal(outs[1], outs[0], "a kept temporary")


class _Normalized(rules.Rule):
    """Not element-wise (each leaf's step divides by that leaf's gradient norm): never sliced."""

    @schema.declare(step=schema.step())
    class State(NamedTuple):
        step: torch.Tensor

    def _init(self, leaves):
        return self.State(step=torch.zeros(len(leaves), dtype=torch.float64))

    def _update(self, params, grads, state, idx, h, ctx):
        return [p - 0.1 * g / g.norm() for p, g in zip(params, grads)], self.State(step=state.step + 1)


def test_a_rule_not_declared_elementwise_is_never_sliced():
    assert rules.Rule.ELEMENTWISE is False and rules.Adam_CM.ELEMENTWISE and rules.critical_class(_Normalized).ELEMENTWISE is False
    rule = _Normalized()
    params = [torch.randn(50)]
    grads = [torch.randn(50)]
    whole, _ = rule.step([p.clone() for p in params], grads, rule.init(params), donate=True)
    sliced, _ = rule.step([p.clone() for p in params], grads, rule.init(params), donate=True, chunk_numel=8,
                          scratch=memopt_func.Scratch(min_numel=1))
    assert_trees_bitwise_equal(sliced, whole, "a reduction over the leaf")


def test_scratch_reuses_its_arena_and_grows_it_at_reset():
    scratch = memopt_func.Scratch(min_numel=4)
    x = torch.zeros(10)
    first = scratch.like(x), scratch.like(x, torch.float64)  # no arena yet: from malloc
    assert not any(map(scratch.holds, first)) and not scratch.handed_out
    scratch.reset()
    a, b = scratch.like(x), scratch.like(x, torch.float64)
    assert scratch.holds(a) and scratch.holds(b) and a.dtype == torch.float32 and b.dtype == torch.float64
    assert scratch.like(torch.zeros(3)).numel() == 3 and not scratch.holds(scratch.like(torch.zeros(3)))  # small: malloc
    c = scratch.like(x)  # past the arena: from malloc, and the arena grows at the next reset
    assert not scratch.holds(c)
    scratch.reset()  # grown: both now come from the arena
    a2, c2 = scratch.like(x), scratch.like(x)
    assert scratch.holds(a2) and scratch.holds(c2) and c2.data_ptr() != a2.data_ptr()
    assert a2.data_ptr() % 64 == 0 and c2.data_ptr() % 64 == 0
    size = scratch.nbytes
    scratch.reset()  # ... and the same memory serves the next round
    assert (scratch.like(x).data_ptr(), scratch.like(x).data_ptr()) == (a2.data_ptr(), c2.data_ptr())
    assert scratch.nbytes == size


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"])
def test_drop_in_keeps_one_scratch_and_its_slices_change_no_bit(name):
    """Float32 parameters, one larger than the chunk: the drop-in's own scratch (kept from step
    to step, its size fixed after the first steps) and slices give the bits of no chunking."""

    def run(chunk, scratch=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 600), torch.nn.Tanh(), torch.nn.Linear(600, 2))
        opt = getattr(memopt_func, name)(model.parameters(), lr=1e-2)
        opt.cpu_chunk_numel = chunk
        if scratch is not None:  # slices above its min_numel, so that they take its arena
            opt.__dict__["_step_scratch"] = scratch
        x = torch.randn(16, 64)
        sizes = []
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sizes.append(opt._step_scratch.nbytes)
        return [p.detach().clone() for p in model.parameters()], pytree.tree_leaves(opt.state_dict()["state"]), sizes

    *got, sizes = run(4096, memopt_func.Scratch(min_numel=1024))
    *want, whole = run(None)  # the default scratch: the 64x600 weight's temporaries are in it
    assert_trees_bitwise_equal(got, want, f"{name} with a 64x600 weight in slices of 4096")
    for s in (sizes, whole):
        assert s[1] > 0 and s[-1] == s[2]  # the first steps (an empty buffer) make fewer temporaries
