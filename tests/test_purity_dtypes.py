"""Rules are pure and replayable, run in every floating dtype, keep state on the parameters'
device, and skip tensors whose gradient is None (SPEC.md, "Invariants" and "The critical buffer").
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree

from memopt_func import rules
from helpers import RULE_VARIANTS, assert_trees_bitwise_equal, clone_tree, make_rule, tensor_leaves

VARIANTS = list(RULE_VARIANTS)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _params(dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    return {"a": r(4, 3), "b": [r(3), r(2, 2, 2)], "c": r(1)}


def _grads(params, k, seed=1):
    gen = torch.Generator().manual_seed(seed + 1000 * k)
    return pytree.tree_map(
        lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype=p.dtype, device=p.device), params
    )


def _warm(rule, params, steps=3):
    state = rule.init(params)
    for k in range(steps):
        params, state = rule.step(params, _grads(params, k), state)
    return params, state


# ---- purity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_never_mutates_its_inputs(variant):
    rule = make_rule(variant)
    params = _params()
    state = rule.init(params)
    for k in range(5):  # every step of a run, including the first (seeding) one and full buffers
        grads = _grads(params, k)
        before = clone_tree((params, grads, state))
        new_params, new_state = rule.step(params, grads, state, lr=0.01 * (k + 1))
        assert_trees_bitwise_equal((params, grads, state), before, f"inputs of step {k + 1}")
        params, state = new_params, new_state


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_does_not_mutate_params_nor_alias_them(variant):
    rule = make_rule(variant)
    params = _params()
    before = clone_tree(params)
    state = rule.init(params)
    assert_trees_bitwise_equal(params, before)
    param_ptrs = {p.untyped_storage().data_ptr() for p in tensor_leaves(params)}
    assert not any(t.untyped_storage().data_ptr() in param_ptrs for t in tensor_leaves(state))


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_inputs_give_bit_identical_outputs(variant):
    rule = make_rule(variant)
    params, state = _warm(rule, _params())
    grads = _grads(params, 99)
    first = rule.step(params, grads, state)
    second = rule.step(params, grads, state)
    assert_trees_bitwise_equal(first, second, "a replayed step")
    # ... and a fresh rule instance with the same hyperparameters replays the same run.
    again = make_rule(variant)
    assert_trees_bitwise_equal(_warm(again, _params()), (params, state), "a replayed run")


def test_critical_test_draws_are_replayable_and_depend_on_the_seed():
    """critical_test > 0 draws from (seed, counter), never host RNG: the global RNG state does not matter."""

    def run(seed, rng_seed):
        torch.manual_seed(rng_seed)
        rule = rules.Adam_C(topC=2, critical_test=0.5, decay=1.0, seed=seed)
        params, state = _warm(rule, _params(), steps=12)
        return state.critical.accepted, params

    acc_a, params_a = run(seed=0, rng_seed=1)
    acc_b, params_b = run(seed=0, rng_seed=2)
    assert torch.equal(acc_a, acc_b)
    assert_trees_bitwise_equal(params_a, params_b)
    runs = [run(seed=s, rng_seed=0)[1] for s in range(1, 6)]
    assert any(not torch.equal(r["a"], params_a["a"]) for r in runs), "the seed never changed an admission"


# ---- dtypes and devices -------------------------------------------------------------------------


def _dtype_hyper(variant, dtype):
    name, kwargs = RULE_VARIANTS[variant]
    if dtype == torch.float16 and "eps" in {h.name for h in rules.RULES[name].HYPERS}:
        # eps=1e-8 is 0 in float16: any zero second moment would give 0/0, as in torch.optim.
        return rules.RULES[name](**kwargs, eps=1e-4)
    return rules.RULES[name](**kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rule_runs_in_every_float_dtype(variant, dtype):
    rule = _dtype_hyper(variant, dtype)
    params0 = _params(dtype)
    params, state = params0, rule.init(params0)
    for k in range(5):
        params, state = rule.step(params, _grads(params, k), state)
    for p, p0 in zip(tensor_leaves(params), tensor_leaves(params0)):
        assert p.dtype == dtype and p.shape == p0.shape and p.device == p0.device
        assert bool(torch.isfinite(p).all()), p
    assert any(not torch.equal(p, p0) for p, p0 in zip(tensor_leaves(params), tensor_leaves(params0)))
    assert state.step.dtype == torch.float64 and state.step.tolist() == [5.0] * 4
    for t in tensor_leaves(state):
        assert t.device == params0["a"].device
        if t.is_floating_point() and t.dim() > 0 and t is not state.step and t.shape[-1:] != (len(state.step),):
            assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_per_tensor_state_has_the_parameter_dtype(variant, dtype):
    """Every per-tensor state field is in the parameter's dtype, but the critical buffer's sum,
    kept in float64 so that it stays the exact sum of the slots."""
    rule = make_rule(variant)
    params = _params(dtype)
    _, state = _warm(rule, params, steps=2)
    n = len(tensor_leaves(params))
    for field, values in _per_leaf_fields(state):
        assert len(values) == n, field
        for t, p in zip(values, tensor_leaves(params)):
            want = torch.float64 if field.endswith("buf_sum") else dtype
            assert t.dtype == want, (field, t.dtype)
            assert tuple(t.shape[t.dim() - p.dim():]) == tuple(p.shape)


@pytest.mark.parametrize("synced", [True, False])
def test_buffer_dtype_stores_slots_low_and_sums_in_float64(synced):
    """SPEC.md: buf in buffer_dtype; buf_sum is float64 (never narrower than the computation) and
    equals the sum of the slots."""
    rule = rules.Adam_C(topC=3, buffer_dtype=torch.bfloat16, synced=synced)
    params, state = _warm(rule, _params(torch.float32), steps=5)
    crit = state.critical
    for buf, total, p in zip(crit.buf, crit.buf_sum, tensor_leaves(params)):
        assert buf.dtype == torch.bfloat16 and buf.shape == (3, *p.shape)
        assert total.dtype == torch.float64
        torch.testing.assert_close(total, buf.double().sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_follows_the_parameters_device(variant):
    """On the meta device every op must stay on the parameters' device: a host tensor anywhere in the
    state or output (other than a 0-d scalar) would raise or show up here."""
    rule = make_rule(variant)
    params = _params(torch.float32, device="meta")
    state = rule.init(params)
    for k in range(3):
        grads = pytree.tree_map(torch.empty_like, params)
        params, state = rule.step(params, grads, state, lr=torch.tensor(0.01, device="meta"))
    assert {t.device.type for t in tensor_leaves((params, state))} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_matches_cpu_and_keeps_state_on_cuda(variant):
    rule = make_rule(variant)
    cpu_params, cpu_state = _warm(rule, _params(torch.float64), steps=6)
    gpu_params, gpu_state = _warm(rule, _params(torch.float64, device="cuda"), steps=6)
    assert {t.device.type for t in tensor_leaves((gpu_params, gpu_state))} == {"cuda"}
    for a, b in zip(tensor_leaves(gpu_params), tensor_leaves(cpu_params)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_scalar_parameter_keeps_its_dtype(variant, dtype):
    """A 0-d parameter (a learnable scale or temperature) stays in its dtype, as do its state tensors,
    and it can take a second step."""
    rule = _dtype_hyper(variant, dtype)
    params = {"scale": torch.tensor(1.5, dtype=dtype), "w": torch.ones(3, dtype=dtype)}
    state = rule.init(params)
    for k in range(2):
        grads = {"scale": torch.tensor(0.5 - k, dtype=dtype), "w": torch.full((3,), 0.25, dtype=dtype)}
        params, state = rule.step(params, grads, state)
        assert params["scale"].dtype == dtype and params["scale"].shape == (), f"step {k + 1}: {params['scale']!r}"
    for field, values in _per_leaf_fields(state):
        assert values[0].dtype == (torch.float64 if field.endswith("buf_sum") else dtype), field


def test_adam_cm_first_step_in_float16_moves_params_by_weight_decay_only():
    """SPEC.md, Adam_CM step 2: the seeding step has ma = 0 and moves p only by weight decay.
    In float16 the default eps=1e-8 rounds to 0, so computing 0 / (sqrt(0) + eps) gives NaN."""
    params = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16)}
    grads = {"w": torch.tensor([0.5, 1.0, -3.0], dtype=torch.float16)}
    rule = rules.Adam_CM()
    new_params, _ = rule.step(params, grads, rule.init(params))
    assert torch.equal(new_params["w"], params["w"]), new_params["w"]


# ---- None gradients -----------------------------------------------------------------------------


def _per_leaf_fields(state, prefix=""):
    for field in getattr(state, "_fields", ()):
        value = getattr(state, field)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            yield from _per_leaf_fields(value, prefix + field + ".")
        elif isinstance(value, tuple) and value:
            yield prefix + field, value


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_gradient_leaf_is_skipped(variant):
    rule = make_rule(variant)
    params, state = _warm(rule, _params())
    grads = _grads(params, 7)
    grads["b"][0] = None  # flat leaf 1
    new_params, new_state = rule.step(params, grads, state)
    skipped = 1
    flat_old, flat_new = tensor_leaves(params), tensor_leaves(new_params)
    assert len(flat_new) == len(flat_old)
    for i, (p_old, p_new) in enumerate(zip(flat_old, flat_new)):
        if i == skipped:
            assert torch.equal(p_new, p_old)
        else:
            assert not torch.equal(p_new, p_old), f"leaf {i} with a gradient did not move"
    assert new_state.step.tolist() == [s + (0 if i == skipped else 1) for i, s in enumerate(state.step.tolist())]
    for (field, old), (_, new) in zip(_per_leaf_fields(state), _per_leaf_fields(new_state)):
        assert torch.equal(new[skipped], old[skipped]), f"{field}[{skipped}] changed"
    crit = getattr(state, "critical", None)
    if crit is not None:
        new_crit = new_state.critical
        if crit.keys.shape[0] == 1:
            # Synced: the group's keys and counters still move with the others.
            assert int(new_crit.offers[0]) == int(crit.offers[0]) + 1
            assert not torch.equal(new_crit.keys, crit.keys)
        else:
            assert torch.equal(new_crit.keys[skipped], crit.keys[skipped])
            for name in ("count", "offers", "accepted"):
                assert int(getattr(new_crit, name)[skipped]) == int(getattr(crit, name)[skipped]), name
            assert int(new_crit.offers[0]) == int(crit.offers[0]) + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_none_gradients_change_nothing(variant):
    rule = make_rule(variant)
    params, state = _warm(rule, _params())
    before = clone_tree((params, state))
    nones = pytree.tree_map(lambda p: None, params)
    new_params, new_state = rule.step(params, nones, state)
    assert_trees_bitwise_equal((new_params, new_state), before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_leaf_without_gradient_from_the_start_keeps_fresh_state(variant):
    """A leaf that never had a gradient: after many steps its state is still init's (zeros, step 0)."""
    rule = make_rule(variant)
    params = _params()
    fresh = rule.init(params)
    state = fresh
    for k in range(4):
        grads = _grads(params, k)
        grads["c"] = None  # flat leaf 3
        params, state = rule.step(params, grads, state)
    assert state.step[3].item() == 0.0
    for (field, old), (_, new) in zip(_per_leaf_fields(fresh), _per_leaf_fields(state)):
        assert torch.equal(new[3], old[3]), field
    # ... and when its gradient arrives it takes a first step like any first step
    # (same update as a fresh run of that tensor alone, for the non-synced rules).
    if getattr(state, "critical", None) is None or state.critical.keys.shape[0] > 1:
        c0 = params["c"]
        g = torch.tensor([0.7], dtype=torch.float64)
        grads = pytree.tree_map(lambda p: None, params)
        grads["c"] = g
        stepped, _ = rule.step(params, grads, state)
        alone, _ = rule.step({"c": c0}, {"c": g}, rule.init({"c": c0}))
        assert torch.equal(stepped["c"], alone["c"]) or math.isclose(stepped["c"].item(), alone["c"].item(), rel_tol=1e-15)
