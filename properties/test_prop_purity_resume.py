"""SPEC.md invariants "Rules are pure" and "Saving state mid-run and resuming gives a bit-identical
continuation", for every rule in ``rules.RULES`` and for the critical buffer over AdEMAMix, AdamW
and RMSprop built with ``rules.with_critical_buffer`` (SPEC.md 8.3; ``strategies.COMBINED_RULES``,
"<Base>+buffer"), with hypothesis-drawn hyperparameters (critical rules with and without a
buffer), pytrees, gradient streams with None leaves, and per-step overrides passed as Python
floats or 0-d tensors.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from memopt_func import rules
from harness import assert_bit_identical, clone, make_rule, run_stream, tensors_with_paths
from strategies import ALL_RULES, COMBINED_RULES, flat, grad_streams, per_step_overrides, rule_hypers, trees

# the named rules and the combined ones ("AdEMAMix+buffer", ...: SPEC.md 8.3)
PURE_RULES = ALL_RULES + COMBINED_RULES


@st.composite
def any_cases(draw, name: str, max_steps: int = 10):
    tree = draw(trees(low_precision=True), label="tree")
    hyper = draw(rule_hypers(name, low_precision=tree.low_precision), label="hyper")
    stream = draw(
        grad_streams(
            tree.n, max_steps=max_steps, low_precision=tree.low_precision,
            per_step=per_step_overrides(name), tensor_per_step=True,
        ),
        label="stream",
    )
    return hyper, tree, stream


@pytest.mark.parametrize("name", PURE_RULES)
@given(data=st.data())
def test_invariant_purity_inputs_never_mutated_and_outputs_deterministic(name, data):
    """Invariant "rules are pure: inputs are never mutated; the same inputs give bit-identical
    outputs". At every step: params, grads, state and per-step tensors are bit-identical after
    the call; calling again with the same objects, and with fresh copies of them, gives
    bit-identical new params and new state."""
    hyper, tree, stream = data.draw(any_cases(name))
    rule = make_rule(name, hyper)
    params = tree.build()
    state = rule.init(params)
    leaves, spec = flat(params)
    for k, plan in enumerate(stream):
        grads = pytree.tree_unflatten(plan.grads(leaves), spec)
        kw = plan.kwargs()
        snapshot = clone((params, grads, state, kw))
        out = rule.step(params, grads, state, **kw)
        assert_bit_identical((params, grads, state, kw), snapshot, f"step {k}: inputs after step")
        again = rule.step(params, grads, state, **kw)
        assert_bit_identical(again, out, f"step {k}: second call on the same inputs")
        copy = clone(snapshot)
        fresh = rule.step(copy[0], copy[1], copy[2], **copy[3])
        assert_bit_identical(fresh, out, f"step {k}: call on equal copies of the inputs")
        params, state = out
        leaves = flat(params)[0]


def _save_load(obj):
    """torch.save, then plain torch.load(weights_only=True): memopt_func.rules allow-lists its
    state classes on import. (torch.serialization.safe_globals as a context would remove them
    again on exit.)"""
    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=True)


@pytest.mark.parametrize("name", PURE_RULES)
@given(data=st.data())
def test_invariant_resume_equivalence_save_load_bit_identical(name, data):
    """Invariant "saving state mid-run and resuming gives a bit-identical continuation".

    Run k steps, torch.save params and state to a BytesIO, torch.load them with
    ``weights_only=True`` (memopt_func.rules allow-lists its state classes), build a fresh rule with the same hyperparameters, and
    continue: every later step's params and state are bit-identical to the uninterrupted run
    (the critical_test draw counter included)."""
    hyper, tree, stream = data.draw(any_cases(name))
    k = data.draw(st.integers(0, len(stream)), label="save after step")
    straight = run_stream(make_rule(name, hyper), tree, stream)
    head = run_stream(make_rule(name, hyper), tree, stream[:k])
    params = tree.build() if k == 0 else None
    state = make_rule(name, hyper).init(params) if k == 0 else head[-1].state_after
    _, spec = flat(tree.build())
    if k:
        params = pytree.tree_unflatten(head[-1].params_after, spec)
    loaded = _save_load({"params": params, "state": state})
    assert_bit_identical(loaded["state"], state, "state after the save/load round trip")
    assert_bit_identical(loaded["params"], params, "params after the save/load round trip")
    tail = run_stream(make_rule(name, hyper), tree, stream[k:], state=loaded["state"], params=loaded["params"])
    for a, b in zip(straight[k:], tail):
        assert_bit_identical(b.params_after, a.params_after, f"step {a.k} (resumed after {k}): params")
        assert_bit_identical(b.state_after, a.state_after, f"step {a.k} (resumed after {k}): state")


def test_invariant_resume_equivalence_state_loads_with_plain_weights_only():
    """Invariant "saving state mid-run and resuming", the loading half: every rule's state saved
    with torch.save loads with plain ``torch.load(..., weights_only=True)`` (torch's default since
    2.6) without the caller allow-listing memopt_func.rules' state classes; so does the state of
    a critical buffer over AdEMAMix, AdamW and RMSprop (``with_critical_buffer``, SPEC.md 8.3)."""
    refused = {}
    for name in (*rules.RULES, *COMBINED_RULES):
        rule = make_rule(name, {})
        params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
        state = rule.step(params, {"w": torch.randn(3, 2), "b": torch.randn(2)}, rule.init(params))[1]
        try:
            loaded = _save_load(state)
        except Exception as e:  # noqa: BLE001 - collect every rule's failure, then report
            refused[name] = str(e).strip().splitlines()[-3:]
            continue
        assert_bit_identical(loaded, state, f"{name} state loaded with weights_only=True")
    assert not refused, f"torch.load(weights_only=True) refuses the state of {sorted(refused)}: {refused}"


@pytest.mark.parametrize("name", PURE_RULES)
@given(data=st.data())
def test_step_keeps_tree_structure_dtypes_and_shapes(name, data):
    """Not a SPEC invariant by name, but what the others lean on: new params have the params'
    pytree structure, and every leaf keeps its dtype, shape and device; the state keeps its type
    and the dtype and shape of every tensor in it, step after step (0-d and low-precision leaves
    included)."""
    hyper, tree, stream = data.draw(any_cases(name))
    rule = make_rule(name, hyper)
    params = tree.build()
    state = rule.init(params)
    _, spec = flat(params)
    layout = [(p, t.dtype, tuple(t.shape)) for p, t in tensors_with_paths(state) if isinstance(t, torch.Tensor)]
    for rec in run_stream(rule, tree, stream):
        for i, (a, b) in enumerate(zip(rec.params_before, rec.params_after)):
            assert (b.dtype, b.shape, b.device) == (a.dtype, a.shape, a.device), (
                f"step {rec.k} leaf {i}: {a.dtype} {tuple(a.shape)} became {b.dtype} {tuple(b.shape)}"
            )
        assert type(rec.state_after) is type(state)
        now = [(p, t.dtype, tuple(t.shape)) for p, t in tensors_with_paths(rec.state_after) if isinstance(t, torch.Tensor)]
        assert now == layout, f"step {rec.k}: state layout changed: {sorted(set(now) ^ set(layout))}"
