"""SPEC.md additions where real training takes the rules, as properties:

* the skip rule: a tensor without a gradient (frozen, or missing at some steps) is left untouched
  by every path (functional rule, eager drop-in, flat ``Stepper``), and the paths agree;
* "A non-finite gradient never produces a non-finite key; healthy tensors follow the run in which
  the bad tensor had no gradient for the buffer";
* "``buf_sum`` stays exact to the current slots' rounding after streams whose scale spans 1e6".

The critical rules here (``strategies.CRITICAL_RULES``) include the buffer over AdEMAMix, AdamW
and RMSprop made by ``rules.with_critical_buffer`` (SPEC.md 8.3, "<Base>+buffer"; their drop-in
is ``optim.from_rule``). The properties that involve admission assert, through
``harness.sees_admissions_and_refusals``, that enough of their examples saw a full buffer both
admit and refuse (SPEC.md invariant "Every property that involves admission sees both admissions
and refusals in its examples").
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch import nn

from harness import ADMISSIONS, full_buffer_choices, make_rule, rows_moved, sees_admissions_and_refusals
from memopt_func import optim, rules
from memopt_func.compiled import Stepper
from strategies import COMBINED_RULES, CRITICAL_RULES, grad_streams, rule_hypers, shape_lists

SKIP_RULES = CRITICAL_RULES + ("AdEMAMix", "Adam", "AdamW", "SGD", "RMSprop")
DROPIN = {"Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"}
# Share of a property's examples (those with a buffer) that must see a full buffer both admit
# and refuse; as in test_prop_buffer_invariants.py.
MIN_DECIDING_SHARE = 0.12


def _start(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(
    # critical rules at least half the time: they are where admission meets the skip rule
    name=st.one_of(st.sampled_from(CRITICAL_RULES), st.sampled_from(SKIP_RULES)),
    data=st.data(),
    shapes=shape_lists(min_leaves=2, max_leaves=6, runs=True),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariant_skipped_tensors_are_untouched_and_every_path_agrees(name, data, shapes, seed):
    """Random frozen tensors and intermittently missing gradients: the functional rule, the
    eager drop-in (``optim.from_rule`` for the combined rules) and the flat Stepper (which moves
    to per-tensor stepping at the first missing gradient) give the same run, and a tensor without
    a gradient is bit-identical to before (SPEC 2.5). Examples with a buffer count towards "sees
    both admissions and refusals"."""
    # a buffer always exists for a critical name (kappa 0 / topC 0 is the base rule: the
    # reductions property shows it, None gradients included; the base rules are drawn here too)
    hyper = data.draw(rule_hypers(name, deciding=True, **({"buffer": True} if name in CRITICAL_RULES else {})))
    if "synced" in hyper:
        hyper["synced"] = True  # a flat stepper needs one key row per group
    hyper.pop("buffer_dtype", None)
    frozen = data.draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    if all(frozen):
        frozen[0] = False
    # a buffer fills (topC steps), then decides (3 to 10 more)
    fill = hyper.get("topC", 0)
    stream = data.draw(grad_streams(len(shapes), min_steps=fill + 3, max_steps=fill + 10, walk=True, leaf_scales=True))
    rule = make_rule(name, hyper)
    start = _start(shapes, seed)

    ref_params, ref_state = [p.clone() for p in start], rule.init(start)
    buffered = getattr(ref_state, "critical", None) is not None
    admitted = refused = 0
    model_params = [nn.Parameter(p.clone(), requires_grad=not f) for p, f in zip(start, frozen)]
    if name in DROPIN:
        dropin = getattr(optim, name)(model_params, **hyper)
    elif name in COMBINED_RULES:
        dropin = optim.from_rule(model_params, rule)
    else:
        dropin = None
    stepper_params = [nn.Parameter(p.clone(), requires_grad=not f) for p, f in zip(start, frozen)]
    stepper = Stepper(rule, stepper_params, compile=False)
    skipped_any = False
    for plan in stream:
        grads = [None if f else g for g, f in zip(plan.grads(start), frozen)]
        skipped = [i for i, g in enumerate(grads) if g is None]
        skipped_any |= bool(skipped) and len(skipped) < len(grads)
        before = [p.detach().clone() for p in stepper_params]
        ref_before = [p.clone() for p in ref_params]
        state_before = ref_state
        ref_params, ref_state = rule.step(ref_params, grads, ref_state)
        if buffered:
            present = tuple(g is not None for g in grads)
            a, r = full_buffer_choices(state_before.critical, ref_state.critical, rows_moved(True, present))
            admitted, refused = admitted + a, refused + r
        if dropin is not None:
            for p, g in zip(model_params, grads):
                p.grad = g
            dropin.step()
        for p, g in zip(stepper_params, grads):
            p.grad = None if g is None else g.clone()
        stepper.step()
        for i in skipped:
            assert torch.equal(stepper_params[i], before[i]), f"Stepper moved tensor {i}, which had no gradient"
            assert torch.equal(ref_params[i], ref_before[i]), f"the rule moved tensor {i}, which had no gradient"
    event(f"some tensors skipped: {skipped_any}")
    if buffered:
        ADMISSIONS.note(admitted, refused)
    for i, (r, f) in enumerate(zip(ref_params, frozen)):
        if f:
            assert torch.equal(r, start[i]) and torch.equal(stepper_params[i], start[i])
        if dropin is not None:
            assert torch.equal(model_params[i], r), f"eager drop-in differs from the rule at tensor {i}"
        torch.testing.assert_close(stepper_params[i].detach(), r, rtol=1e-9, atol=1e-12)


@given(data=st.data(), shapes=shape_lists(min_leaves=2, max_leaves=5), seed=st.integers(0, 2**31 - 1))
def test_invariant_skip_rule_matches_torch_optim(data, shapes, seed):
    """Adam_C at kappa=0 is torch.optim.Adam, SGD_C at kappa=0 is torch.optim.SGD, with the same
    random pattern of missing gradients (a skipped tensor's step counter is held)."""
    which = data.draw(st.sampled_from(["Adam_C", "SGD_C"]))
    stream = data.draw(grad_streams(len(shapes), min_steps=2, max_steps=8))
    start = _start(shapes, seed)
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    if which == "Adam_C":
        a, b = optim.Adam_C(ours, lr=1e-2, kappa=0.0), torch.optim.Adam(theirs, lr=1e-2)
    else:
        a, b = optim.SGD_C(ours, lr=1e-2, momentum=0.9, kappa=0.0), torch.optim.SGD(theirs, lr=1e-2, momentum=0.9)
    for plan in stream:
        grads = plan.grads(start)
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
        a.step()
        b.step()
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(
    data=st.data(),
    shapes=shape_lists(min_leaves=2, max_leaves=5),
    seed=st.integers(0, 2**31 - 1),
    synced=st.booleans(),
)
def test_invariant_nonfinite_gradient_never_makes_a_nonfinite_key(name, data, shapes, seed, synced):
    """Invariant "a non-finite gradient never produces a non-finite key; the healthy tensors
    follow the run in which the bad tensor had no gradient for the buffer" (SPEC 2.6), for each
    critical rule by name, the combined "<Base>+buffer" ones included: one tensor's gradient
    holds a NaN or +-inf at some steps; every key stays finite, each left-out tensor is counted
    in ``nonfinite``, and the decisions, keys and healthy tensors' parameters and slots match the
    run where that tensor had a None gradient at those steps. The reference run's full-buffer
    decisions count towards "sees both admissions and refusals"."""
    stream = data.draw(grad_streams(len(shapes), min_steps=3, max_steps=10, allow_none=False, walk=True, leaf_scales=True))
    sized = [i for i, s in enumerate(shapes) if math.prod(s) > 0]
    assume(sized)
    bad_leaf = data.draw(st.sampled_from(sized))
    bad_steps = set(data.draw(st.lists(st.integers(0, len(stream) - 1), min_size=1, max_size=3)))
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    rule = make_rule(name, {"lr": 1e-2, "topC": data.draw(st.integers(1, 4)), "decay": data.draw(st.floats(0.9, 0.999)), "synced": synced})
    start = _start(shapes, seed)
    runs = []
    admitted = refused = 0
    for none_for_buffer in (False, True):
        params, state = [p.clone() for p in start], rule.init(start)
        for k, plan in enumerate(stream):
            grads = plan.grads(start)
            if k in bad_steps:
                grads[bad_leaf] = None if none_for_buffer else grads[bad_leaf].clone().view(-1).index_fill(0, torch.tensor([0]), value).view(shapes[bad_leaf])
            before = state
            params, state = rule.step(params, grads, state)
            assert torch.isfinite(state.critical.keys).all(), f"a non-finite key at step {k + 1}"
            if none_for_buffer:
                a, r = full_buffer_choices(before.critical, state.critical, rows_moved(synced, tuple(g is not None for g in grads)))
                admitted, refused = admitted + a, refused + r
        runs.append((params, state))
    ADMISSIONS.note(admitted, refused)
    (p_bad, s_bad), (p_ref, s_ref) = runs
    assert int(s_bad.critical.nonfinite.sum()) == len(bad_steps)
    healthy = [i for i in range(len(shapes)) if i != bad_leaf]
    # the synced sum over all tensors (the bad one as 0) may round differently from the sum over
    # the others alone: equal to rounding, with the same decisions
    rows = [0] if synced else healthy
    assert torch.equal(s_bad.critical.accepted[rows], s_ref.critical.accepted[rows])
    assert torch.equal(s_bad.critical.count[rows], s_ref.critical.count[rows])
    torch.testing.assert_close(s_bad.critical.keys[rows], s_ref.critical.keys[rows], rtol=1e-12, atol=0)
    for i in healthy:
        torch.testing.assert_close(p_bad[i], p_ref[i], rtol=1e-12, atol=1e-300, msg=f"healthy tensor {i} left the run without the bad offer")
        torch.testing.assert_close(s_bad.critical.buf[i], s_ref.critical.buf[i], rtol=1e-12, atol=1e-300)


@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    start_exp=st.floats(-1.0, 4.0),
    span=st.floats(3.0, 6.0),
    steps=st.integers(60, 200),
    jumps=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariant_buf_sum_exact_after_a_1e6_scale_sweep(data, dtype, start_exp, span, steps, jumps, seed):
    """A stream whose scale falls by up to six decades (smoothly, or in a few abrupt drops, with
    rises between): buf_sum equals the float64 sum of the filled slots to a few ulps of their
    magnitude at every step. A running ``+= x - old`` misses this by orders of magnitude.
    (Invariant "buf_sum stays exact to the current slots' rounding after streams whose scale
    spans 1e6"; its full-buffer decisions count towards "sees both admissions and refusals".)"""
    top_c = data.draw(st.integers(2, 6))
    rule = rules.Adam_C(lr=1e-3, topC=top_c, decay=data.draw(st.floats(0.9, 0.999)))
    gen = torch.Generator().manual_seed(seed)
    params = [torch.zeros(33, dtype=dtype), torch.zeros(4, 4, dtype=dtype)]
    state = rule.init(params)
    admitted = refused = 0
    for k in range(steps):
        frac = k / (steps - 1)
        level = start_exp - span * (round(frac * 3) / 3 if jumps else frac) + 0.3 * math.sin(k)
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 10.0**level).to(dtype) for p in params]
        # the decision counters are read before the step: donate=True may reuse the old state
        before = state.critical._replace(count=state.critical.count.clone(), offers=state.critical.offers.clone(), accepted=state.critical.accepted.clone())
        params, state = rule.step(params, grads, state, donate=True)
        a, r = full_buffer_choices(before, state.critical, [0])
        admitted, refused = admitted + a, refused + r
        crit = state.critical
        filled = int(crit.count[0])
        for buf, total in zip(crit.buf, crit.buf_sum):
            slots = buf[:filled].to(torch.float64)
            err = (total.to(torch.float64) - slots.sum(0)).abs()
            bound = 8 * torch.finfo(dtype).eps * slots.abs().sum(0) + torch.finfo(dtype).tiny
            assert (err <= bound).all(), f"step {k + 1}: buf_sum off the slots' sum by {float((err / bound).max()):.2g} bounds"
    ADMISSIONS.note(admitted, refused)
