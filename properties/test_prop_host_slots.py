"""On a CPU the critical buffer reads its slot index on the host (``critical_buffer.slot_on_host``):
the chosen row is a view, read and written in one pass, and an eager step with one admission
flag per leaf writes nothing for a refused offer. On an accelerator the index stays on the
device: row ``s`` is gathered and written back with a masked value (a flat leaf: refused
elements to a sink row). Both are one formula; this property holds them to it bit for bit.

Every critical rule (the package's four and the buffer over AdEMAMix, AdamW and RMSprop), over
hypothesis-drawn pytrees (bfloat16 and float64 leaves, runs of equal-sized tensors), streams
with missing and non-finite-free gradients whose scale grows and shrinks, synced and per-tensor
buffers, narrower ``buffer_dtype``: the pure step, the donated (in-place) step and a flat
``Stepper(compile=False)`` (one admission flag per element) each give the same bits with the
host read as without it.
"""

from __future__ import annotations

import contextlib

from unittest import mock

import torch

import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import ADMISSIONS, assert_bit_identical, clone, full_buffer_choices, make_rule, rows_moved, sees_admissions_and_refusals
from memopt_func import _slot_write
from memopt_func import critical_buffer as cb
from memopt_func.compiled import Stepper
from strategies import CRITICAL_RULES, flat
from test_prop_buffer_invariants import critical_cases


@contextlib.contextmanager
def _device_form():
    """Step as on an accelerator: the slot index is never read on the host (checked: the
    buffer's own host read answers None under the patch, so the patch reaches the code)."""
    with mock.patch.object(_slot_write, "slot_on_host", lambda buf: False):
        assert cb.host_flags(torch.ones(1, dtype=torch.bool), torch.zeros(1)) is None
        yield


def _run(rule, tree, stream, donate: bool):
    """Params and state after the stream, and the (admitted, refused) offers to a full buffer."""
    params = tree.build()
    state = rule.init(params)
    leaves, spec = flat(params)
    admitted = refused = 0
    synced = state.critical.keys.shape[0] == 1
    for plan in stream:
        grads = pytree.tree_unflatten(plan.grads(leaves), spec)
        before = clone(state.critical)
        params, state = rule.step(params, grads, state, donate=donate, **plan.kwargs())
        a, r = full_buffer_choices(before, state.critical, rows_moved(synced, plan.present))
        admitted, refused = admitted + a, refused + r
        leaves = flat(params)[0]
    return (params, state), (admitted, refused)


@sees_admissions_and_refusals(0.12)
@given(name=st.sampled_from(CRITICAL_RULES), data=st.data(), donate=st.booleans())
def test_invariant_host_slot_read_equals_device_form(name, data, donate):
    """The pure (or donated) eager step with the slot read on the host gives bit-identical
    parameters, moments, slots, ``buf_sum``, keys and counters to the device form."""
    hyper, tree, stream = data.draw(critical_cases(name))
    rule = make_rule(name, hyper)
    host, mix = _run(rule, tree, stream, donate)
    with _device_form():
        device, _ = _run(rule, tree, stream, donate)
    assert_bit_identical(host, device, f"{name} donate={donate}")
    ADMISSIONS.note(*mix)


def _flat_run(rule, tree, stream):
    stepper = Stepper(rule, tree.build(), compile=False)
    leaves, spec = flat(stepper.params)
    for plan in stream:
        stepper.step(pytree.tree_unflatten(plan.grads(leaves), spec), **plan.kwargs())
        leaves = flat(stepper.params)[0]
    return [t.clone() for t in leaves], clone(stepper.state)


@settings(max_examples=max(4, settings().max_examples // 2))
@given(name=st.sampled_from(CRITICAL_RULES), data=st.data())
def test_invariant_flat_host_slot_read_equals_device_form(name, data):
    """A flat leaf (one admission flag per element of its tensors laid end to end) written in
    one pass over the host-indexed row equals the gathered, masked write, bit for bit."""
    hyper, tree, stream = data.draw(critical_cases(name, allow_none=False))
    hyper = {**hyper, "synced": True}
    rule = make_rule(name, hyper)
    if rule.hyper.get("kappa", 1) == 0:
        return
    host = _flat_run(rule, tree, stream)
    with _device_form():
        device = _flat_run(rule, tree, stream)
    assert_bit_identical(host, device, f"flat {name}")
