"""Invalid input raises a clear error, before any state exists or changes.

SPEC.md, "Degenerate settings": every invalid hyperparameter raises ValueError naming the
argument and the value; sparse gradients and complex parameters are refused clearly.
DESIGN.md: errors are ValueError naming the argument and the bad value, raised before any
state changes.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from memopt_func import rules
from helpers import assert_trees_bitwise_equal, clone_tree

NAN = float("nan")
INF = float("inf")

TWO_BETAS = ["Adam", "AdamW", "Adam_C", "Adam_CM"]
CRITICAL = ["Adam_C", "RMSprop_C", "SGD_C", "Adam_CM"]
ALL = list(rules.RULES)


def _hypers(rule: str) -> set[str]:
    return {h.name for h in rules.RULES[rule].HYPERS}


def _cases() -> list[tuple[str, str, Any, str]]:
    """(rule, argument, bad value, text the message must contain to show the value)."""
    cases = []

    def add(rules, arg, value, shown):
        for rule in rules:
            if arg in _hypers(rule):
                cases.append((rule, arg, value, shown))

    add(ALL, "lr", -1e-3, "-0.001")
    add(ALL, "lr", NAN, "nan")
    add(ALL, "lr", INF, "inf")
    add(ALL, "lr", "0.1", "0.1")
    add(ALL, "lr", True, "True")
    add(ALL, "lr", None, "None")
    add(ALL, "lr", torch.tensor(-0.5), "-0.5")
    add(ALL, "lr", torch.tensor([0.1, 0.2]), "tensor")
    add(ALL, "eps", -1e-8, "-1e-08")
    add(ALL, "eps", NAN, "nan")
    add(ALL, "weight_decay", -0.1, "-0.1")
    add(ALL, "weight_decay", NAN, "nan")
    add(ALL, "weight_decay", torch.tensor(-1.0), "-1.0")
    add(TWO_BETAS, "betas", (0.9, 1.0), "1.0")
    add(TWO_BETAS, "betas", (1.5, 0.999), "1.5")
    add(TWO_BETAS, "betas", (-0.1, 0.999), "-0.1")
    add(TWO_BETAS, "betas", (0.9, NAN), "nan")
    add(TWO_BETAS, "betas", (0.9,), "(0.9,)")
    add(TWO_BETAS, "betas", (0.9, 0.999, 0.9999), "(0.9, 0.999, 0.9999)")
    add(TWO_BETAS, "betas", 0.9, "0.9")
    add(TWO_BETAS, "betas", ("a", 0.999), "a")
    add(["AdEMAMix"], "betas", (0.9, 0.999), "(0.9, 0.999)")
    add(["AdEMAMix"], "betas", (0.9, 0.999, 1.0), "1.0")
    add(["AdEMAMix"], "betas", (0.9, -0.5, 0.9999), "-0.5")
    add(["AdEMAMix"], "alpha", -2.0, "-2.0")
    add(["AdEMAMix"], "alpha", NAN, "nan")
    add(["RMSprop", "RMSprop_C"], "alpha", -0.1, "-0.1")
    add(["RMSprop", "RMSprop_C"], "alpha", NAN, "nan")
    add(["SGD", "SGD_C", "RMSprop", "RMSprop_C"], "momentum", -0.5, "-0.5")
    add(["SGD", "SGD_C", "RMSprop", "RMSprop_C"], "momentum", NAN, "nan")
    add(["SGD", "SGD_C"], "dampening", NAN, "nan")
    add(["SGD", "SGD_C"], "dampening", INF, "inf")
    add(CRITICAL, "kappa", -1.0, "-1.0")
    add(CRITICAL, "kappa", NAN, "nan")
    add(CRITICAL, "decay", -0.1, "-0.1")
    add(CRITICAL, "decay", 1.5, "1.5")
    add(CRITICAL, "decay", NAN, "nan")
    add(CRITICAL, "decay", "0.7", "0.7")
    add(CRITICAL, "topC", -1, "-1")
    add(CRITICAL, "topC", 2.0, "2.0")
    add(CRITICAL, "topC", 2.5, "2.5")
    add(CRITICAL, "topC", True, "True")
    add(CRITICAL, "topC", "5", "5")
    add(CRITICAL, "topC", None, "None")
    add(CRITICAL, "aggr", "max", "max")
    add(CRITICAL, "aggr", "SUM", "SUM")
    add(CRITICAL, "aggr", None, "None")
    add(CRITICAL, "critical_test", -0.1, "-0.1")
    add(CRITICAL, "critical_test", 1.5, "1.5")
    add(CRITICAL, "critical_test", NAN, "nan")
    add(CRITICAL, "buffer_dtype", torch.int32, "int32")
    add(CRITICAL, "buffer_dtype", torch.bool, "bool")
    add(CRITICAL, "buffer_dtype", torch.complex64, "complex64")
    add(CRITICAL, "buffer_dtype", "float16", "float16")
    add(CRITICAL, "synced", 1, "1")
    add(CRITICAL, "synced", "yes", "yes")
    add(CRITICAL, "seed", 1.5, "1.5")
    add(["Adam", "AdamW", "Adam_C", "Adam_CM"], "amsgrad", "yes", "yes")
    add(["Adam", "AdamW", "Adam_C", "Adam_CM"], "amsgrad", 1, "1")
    add(["RMSprop", "RMSprop_C"], "centered", None, "None")
    add(["SGD"], "nesterov", "true", "true")
    for warmup in ("alpha_warmup", "beta3_warmup"):
        add(["AdEMAMix"], warmup, 0, "0")
        add(["AdEMAMix"], warmup, -5, "-5")
        add(["AdEMAMix"], warmup, 10.0, "10.0")
        add(["AdEMAMix"], warmup, True, "True")
        add(["AdEMAMix"], warmup, "10", "10")
    return cases


CASES = _cases()


def test_every_rule_has_invalid_cases():
    assert {rule for rule, *_ in CASES} == set(ALL)


@pytest.mark.parametrize("rule,arg,value,shown", CASES, ids=[f"{r}-{a}={v!r}" for r, a, v, _ in CASES])
def test_invalid_hyperparameter_raises_value_error_naming_argument_and_value(rule, arg, value, shown):
    with pytest.raises(ValueError) as info:
        rules.RULES[rule](**{arg: value})
    message = str(info.value)
    assert arg in message, message
    assert shown in message, message


@pytest.mark.parametrize(
    "kwargs",
    [dict(nesterov=True), dict(nesterov=True, momentum=0.0), dict(nesterov=True, momentum=0.9, dampening=0.1)],
    ids=["default-momentum", "momentum=0", "dampening=0.1"],
)
def test_sgd_nesterov_needs_momentum_and_zero_dampening(kwargs):
    with pytest.raises(ValueError, match="nesterov"):
        rules.SGD(**kwargs)


def test_sgd_nesterov_with_momentum_is_accepted():
    rules.SGD(nesterov=True, momentum=0.9)


@pytest.mark.parametrize("rule", ALL)
def test_boundary_values_are_accepted(rule):
    """The closed ends of each range are legal: lr/eps/weight_decay 0, betas 0, decay 0 and 1,
    topC 0, critical_test 0 and 1, warmup 1."""
    names = _hypers(rule)
    edges = {k: 0.0 for k in ("lr", "eps", "weight_decay") if k in names}
    if "betas" in names:
        edges["betas"] = (0.0,) * len(rules.RULES[rule]().hyper["betas"])
    for extra in (dict(decay=0.0, topC=0, critical_test=0.0), dict(decay=1.0, topC=1, critical_test=1.0)):
        kwargs = dict(edges, **{k: v for k, v in extra.items() if k in names})
        rules.RULES[rule](**kwargs)
    if rule == "AdEMAMix":
        rules.AdEMAMix(alpha_warmup=1, beta3_warmup=1, alpha=0.0)


@pytest.mark.parametrize("rule", ALL)
def test_unknown_hyperparameter_raises_type_error_naming_it(rule):
    with pytest.raises(TypeError, match="not_a_hyper"):
        rules.RULES[rule](not_a_hyper=1.0)


def test_misspelt_hyperparameter_raises_type_error():
    with pytest.raises(TypeError, match="weightdecay"):
        rules.Adam(weightdecay=0.1)
    with pytest.raises(TypeError, match="topc"):
        rules.Adam_CM(topc=3)  # the published code's parameter is topC; spelling matters


# ---- errors at step time: nothing may change ------------------------------------------------------


def _params():
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "layers": [torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(2, 2, generator=gen, dtype=torch.float64)],
    }


def _grads(params):
    return {"w": torch.ones_like(params["w"]), "layers": [torch.ones_like(t) for t in params["layers"]]}


def _warm_state(rule, params):
    """A state after two steps, so that buffers and counters hold non-trivial values."""
    state = rule.init(params)
    for k in range(2):
        grads = {"w": (k + 1.0) * torch.ones_like(params["w"]), "layers": [-(k + 2.0) * torch.ones_like(t) for t in params["layers"]]}
        params, state = rule.step(params, grads, state)
    return params, state


VARIANTS = {
    "Adam": dict(amsgrad=True),
    "AdamW": {},
    "SGD": dict(momentum=0.9),
    "RMSprop": dict(momentum=0.5, centered=True),
    "Adam_C": dict(topC=2),
    "RMSprop_C": dict(topC=2, momentum=0.5),
    "SGD_C": dict(topC=2, momentum=0.9),
    "Adam_CM": dict(topC=2, synced=False),
    "AdEMAMix": dict(alpha_warmup=3, beta3_warmup=3),
}


def _expect_no_change(rule_name, make_bad_call, exc=ValueError, match=None):
    """Run a failing step; params, grads and state must be bitwise unchanged afterwards."""
    rule = rules.RULES[rule_name](**VARIANTS[rule_name])
    params, state = _warm_state(rule, _params())
    before = clone_tree((params, state))
    with pytest.raises(exc, match=match) as info:
        make_bad_call(rule, params, state)
    assert_trees_bitwise_equal((params, state), before, "params/state after a failed step")
    return str(info.value)


def _bad_structure_cases(params):
    g = _grads(params)
    return {
        "missing-key": {"w": g["w"]},
        "extra-key": {**g, "extra": torch.ones(1, dtype=torch.float64)},
        "list-too-short": {"w": g["w"], "layers": g["layers"][:1]},
        "tuple-for-list": {"w": g["w"], "layers": tuple(g["layers"])},
        "flat-list": [g["w"], *g["layers"]],
        "renamed-key": {"W": g["w"], "layers": g["layers"]},
    }


@pytest.mark.parametrize("case", list(_bad_structure_cases(_params())))
@pytest.mark.parametrize("rule", ALL)
def test_grads_with_another_structure_raise(rule, case):
    message = _expect_no_change(rule, lambda r, p, s: r.step(p, _bad_structure_cases(p)[case], s))
    assert "structure" in message


@pytest.mark.parametrize("rule", ALL)
def test_grad_of_wrong_shape_raises_naming_the_shapes(rule):
    def call(r, p, s):
        g = _grads(p)
        g["layers"][1] = torch.ones(4, dtype=torch.float64)
        return r.step(p, g, s)

    message = _expect_no_change(rule, call)
    assert "(4,)" in message and "(2, 2)" in message


@pytest.mark.parametrize("rule", ALL)
def test_grad_that_is_not_a_tensor_raises(rule):
    def call(r, p, s):
        g = _grads(p)
        g["w"] = 1.0
        return r.step(p, g, s)

    _expect_no_change(rule, call)


@pytest.mark.parametrize("rule", ALL)
def test_grad_that_broadcasts_is_still_refused(rule):
    """A [3] gradient would broadcast over a [4, 3] parameter; it must not be accepted."""

    def call(r, p, s):
        g = _grads(p)
        g["w"] = torch.ones(3, dtype=torch.float64)
        return r.step(p, g, s)

    _expect_no_change(rule, call)


@pytest.mark.parametrize("rule", ALL)
def test_grad_on_another_device_raises(rule):
    def call(r, p, s):
        g = _grads(p)
        g["w"] = torch.empty(4, 3, dtype=torch.float64, device="meta")
        return r.step(p, g, s)

    message = _expect_no_change(rule, call)
    assert "meta" in message


@pytest.mark.parametrize("rule", ALL)
def test_state_from_a_tree_with_other_leaf_count_raises(rule):
    def call(r, p, s):
        other = {"w": p["w"], "layers": p["layers"][:1]}
        return r.step(other, {"w": torch.ones_like(p["w"]), "layers": [torch.ones_like(p["layers"][0])]}, s)

    _expect_no_change(rule, call)


@pytest.mark.parametrize("rule", ALL)
def test_state_from_a_tree_with_other_shapes_raises(rule):
    """Same number of leaves, other shapes: per-tensor state does not fit."""

    def call(r, p, s):
        other = {"w": torch.zeros(3, 4, dtype=torch.float64), "layers": [torch.zeros(5, dtype=torch.float64), p["layers"][1]]}
        return r.step(other, _grads(other), s)

    _expect_no_change(rule, call)


@pytest.mark.parametrize("rule", ALL)
def test_state_that_is_not_a_state_raises(rule):
    _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), {"step": s.step}))


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("rule", ALL)
def test_sparse_gradient_raises_mentioning_sparse(rule, layout):
    def call(r, p, s):
        g = _grads(p)
        dense = torch.zeros(4, 3, dtype=torch.float64)
        dense[1, 2] = 1.0
        g["w"] = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
        return r.step(p, g, s)

    message = _expect_no_change(rule, call)
    assert "sparse" in message.lower()


@pytest.mark.parametrize("rule", ALL)
def test_complex_gradient_for_real_parameter_raises(rule):
    """A complex gradient must not turn a real parameter complex (or fail deep inside the step)."""

    def call(r, p, s):
        g = _grads(p)
        g["w"] = torch.ones(4, 3, dtype=torch.complex128)
        return r.step(p, g, s)

    message = _expect_no_change(rule, call)
    assert "complex" in message.lower()


@pytest.mark.parametrize("rule", ALL)
def test_gradient_of_another_dtype_is_refused_or_keeps_parameter_dtype(rule):
    """A float32 gradient for float64 parameters (or the reverse): either a ValueError naming the
    dtype, or the step keeps every parameter and state tensor in its own dtype."""
    r = rules.RULES[rule](**VARIANTS[rule])
    for p_dtype, g_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        params = {"w": torch.randn(4, 3, dtype=p_dtype)}
        state = r.init(params)
        try:
            new_params, new_state = r.step(params, {"w": torch.ones(4, 3, dtype=g_dtype)}, state)
        except ValueError as err:
            assert "dtype" in str(err)
            continue
        assert new_params["w"].dtype == p_dtype, f"params became {new_params['w'].dtype}"
        old_dtypes = [t.dtype for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
        new_dtypes = [t.dtype for t in torch.utils._pytree.tree_leaves(new_state) if isinstance(t, torch.Tensor)]
        assert old_dtypes == new_dtypes


@pytest.mark.parametrize("rule", ALL)
def test_complex_parameters_are_refused(rule):
    r = rules.RULES[rule]()
    params = {"w": torch.ones(3, dtype=torch.complex64), "b": torch.ones(2)}
    with pytest.raises(ValueError, match="complex"):
        r.init(params)
    real_state = r.init({"w": torch.ones(3), "b": torch.ones(2)})
    before = clone_tree(real_state)
    with pytest.raises(ValueError, match="complex"):
        r.step(params, {"w": torch.ones(3, dtype=torch.complex64), "b": torch.ones(2)}, real_state)
    assert_trees_bitwise_equal(real_state, before)


@pytest.mark.parametrize("empty", [{}, [], (), {"a": [], "b": {}}], ids=["dict", "list", "tuple", "nested"])
@pytest.mark.parametrize("rule", ALL)
def test_empty_params_are_refused(rule, empty):
    r = rules.RULES[rule]()
    with pytest.raises(ValueError, match="empty"):
        r.init(empty)
    state = r.init({"w": torch.ones(2)})
    with pytest.raises(ValueError):
        r.step(empty, empty, state)


@pytest.mark.parametrize(
    "bad",
    [torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 1.0, "w", torch.ones(3).to_sparse()],
    ids=["int64", "bool", "float", "str", "sparse"],
)
def test_params_that_are_not_dense_real_float_tensors_are_refused(bad):
    for rule in ALL:
        with pytest.raises(ValueError):
            rules.RULES[rule]().init({"ok": torch.ones(2), "bad": bad})


def test_none_params_are_refused():
    with pytest.raises(ValueError):
        rules.Adam().init(None)


def test_params_on_several_devices_are_refused():
    with pytest.raises(ValueError, match="device"):
        rules.Adam().init({"a": torch.ones(2), "b": torch.empty(2, device="meta")})


# ---- per-step hyperparameters ---------------------------------------------------------------------


STATIC = {
    "Adam": [("amsgrad", True)],
    "AdamW": [("amsgrad", True)],
    "SGD": [("nesterov", True)],
    "RMSprop": [("centered", True)],
    "Adam_C": [("topC", 3), ("kappa", 0.5), ("synced", False), ("aggr", "mean"), ("critical_test", 0.1), ("amsgrad", True)],
    "RMSprop_C": [("topC", 3), ("buffer_dtype", torch.float32), ("seed", 3)],
    "SGD_C": [("topC", 3), ("kappa", 2.0)],
    "Adam_CM": [("topC", 3), ("kappa", 0.0), ("aggr", "buffer")],
    "AdEMAMix": [("alpha", 1.0), ("alpha_warmup", 5), ("beta3_warmup", 5)],
}


@pytest.mark.parametrize(
    "rule,arg,value", [(r, a, v) for r, items in STATIC.items() for a, v in items], ids=lambda x: str(x)
)
def test_per_step_override_of_a_fixed_hyperparameter_raises(rule, arg, value):
    assert arg not in rules.RULES[rule].dynamic_names()
    message = _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, **{arg: value}))
    assert repr(arg) in message or arg in message


@pytest.mark.parametrize("rule", ALL)
def test_per_step_override_of_an_unknown_name_raises(rule):
    _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, learning_rate=0.1), match="learning_rate")


@pytest.mark.parametrize("rule", ALL)
def test_dynamic_names_include_lr_and_weight_decay(rule):
    names = rules.RULES[rule].dynamic_names()
    assert "lr" in names and "weight_decay" in names


@pytest.mark.parametrize("rule", ALL)
@pytest.mark.parametrize("value", [-0.1, NAN, "0.1"], ids=["negative", "nan", "str"])
def test_invalid_per_step_lr_raises(rule, value):
    message = _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, lr=value))
    assert "lr" in message


@pytest.mark.parametrize("rule", ALL)
def test_per_step_lr_tensor_must_have_one_element(rule):
    _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, lr=torch.tensor([0.1, 0.2])), match="one element")


@pytest.mark.parametrize("rule", ["Adam", "Adam_C", "Adam_CM"])
def test_invalid_per_step_betas_raise(rule):
    for bad in [(0.9, 1.0), (0.9,), (torch.tensor(0.9),)]:
        _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, betas=bad), match="betas")


@pytest.mark.parametrize("rule", ["Adam_C", "RMSprop_C", "SGD_C", "Adam_CM"])
def test_invalid_per_step_decay_raises(rule):
    for bad in (-0.5, 1.5, NAN):
        _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, decay=bad), match="decay")


@pytest.mark.parametrize("rule", ["SGD", "RMSprop", "SGD_C", "RMSprop_C"])
def test_per_step_momentum_cannot_switch_the_momentum_buffer_on_or_off(rule):
    _expect_no_change(rule, lambda r, p, s: r.step(p, _grads(p), s, momentum=0.0), match="momentum")
    plain = rules.RULES[rule]()  # built with momentum 0: no buffer
    params = _params()
    state = plain.init(params)
    with pytest.raises(ValueError, match="momentum"):
        plain.step(params, _grads(params), state, momentum=0.9)


def test_ademamix_per_step_beta1_cannot_switch_between_zero_and_nonzero():
    _expect_no_change("AdEMAMix", lambda r, p, s: r.step(p, _grads(p), s, betas=(0.0, 0.999, 0.9999)), match="betas")


@pytest.mark.parametrize("rule", ALL)
def test_valid_per_step_override_does_not_change_the_rule(rule):
    """Overrides apply to one step only: the rule's own hyperparameters stay as built."""
    r = rules.RULES[rule](**VARIANTS[rule])
    before = dict(r.hyper)
    params = _params()
    r.step(params, _grads(params), r.init(params), lr=0.5, weight_decay=0.25)
    assert r.hyper == before


def test_error_message_shows_the_value_for_tensor_hyperparameters():
    with pytest.raises(ValueError) as info:
        rules.Adam(lr=torch.tensor(float("nan")))
    assert "lr" in str(info.value) and "nan" in str(info.value)
    assert not math.isnan(rules.Adam(lr=torch.tensor(0.5)).hyper["lr"].item())
