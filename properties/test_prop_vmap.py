"""SPEC.md section 8.2, as a property: under ``torch.func.vmap`` over a leading member dimension,
every rule steps each member exactly as if alone (``foreach=False``), bitwise in float64, for
random trees, hyperparameters (synced and per-tensor buffers; the critical buffer over AdEMAMix,
AdamW and RMSprop made by ``rules.with_critical_buffer``, SPEC.md 8.3, named "<Base>+buffer" as in
``strategies.COMBINED_RULES``) and per-member gradient streams."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from harness import make_rule
from strategies import ALL_RULES, COMBINED_RULES, CRITICAL_RULES, rule_hypers, trees

MEMBERS = 3


def _rule(name: str, hyper: dict, **extra):
    return make_rule(name, {**hyper, **extra})


@st.composite
def cases(draw):
    name = draw(st.sampled_from(ALL_RULES + COMBINED_RULES))
    # kappa == 0 or topC == 0 keeps ``critical=None``, which vmap cannot return: such a rule
    # is its base rule, which is drawn on its own
    hyper = draw(rule_hypers(name, deciding=True, **({"buffer": True} if name in CRITICAL_RULES else {})))
    hyper.pop("buffer_dtype", None)
    tree = draw(trees(min_leaves=1, max_leaves=4, low_precision=False, mixed=False))
    steps = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    return name, hyper, tree, steps, seed


@given(cases())
def test_invariant_vmap_members_step_as_if_alone(case):
    name, hyper, tree, steps, seed = case
    tree = type(tree)(tree.skeleton, tree.shapes, (torch.float64,) * tree.n, tree.seed)
    member_params = [tree.build() for _ in range(MEMBERS)]
    gen = torch.Generator().manual_seed(seed)
    streams = []
    for k in range(steps):
        per_member = []
        for m in range(MEMBERS):
            scale = 10.0 ** (4 * torch.rand((), generator=gen).item() - 2)
            per_member.append(pytree.tree_map(lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale, member_params[m]))
        streams.append(per_member)
    stack = lambda trees_: pytree.tree_map(lambda *xs: torch.stack(xs), *trees_)  # noqa: E731
    rule = _rule(name, hyper)
    params = stack(member_params)
    state = vmap(rule.init)(params)
    for k in range(steps):
        params, state = vmap(rule.step)(params, stack(streams[k]), state)
    alone = _rule(name, hyper, foreach=False)
    for m in range(MEMBERS):
        p, s = member_params[m], alone.init(member_params[m])
        for k in range(steps):
            p, s = alone.step(p, streams[k][m], s)
        for a, b in zip(pytree.tree_leaves(p), pytree.tree_leaves(params)):
            assert torch.equal(a, b[m]), f"{name}: member {m} differs from its own run"
        for a, b in zip(pytree.tree_leaves(s), pytree.tree_leaves(state)):
            assert torch.equal(a, b[m]), f"{name}: member {m}'s state differs from its own run"
