"""Constructor API of the drop-ins: published positional orders, SPEC defaults, and the errors
for invalid hyperparameters (at construction and in add_param_group), sparse gradients,
complex parameters and unknown keywords."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from dropin_common import CRITICAL, OPTIMIZERS, dropin, mlp, mse

# The published constructors' positional orders (cmoptimizer; AdEMAMix's PyTorch reference).
PUBLISHED_ORDER = {
    "Adam_CM": ["lr", "betas", "eps", "decay", "kappa", "topC", "weight_decay", "amsgrad", "critical_test", "synced", "buffer_dtype"],
    "Adam_C": ["lr", "betas", "eps", "decay", "kappa", "topC", "weight_decay", "amsgrad", "critical_test", "synced", "buffer_dtype"],
    "RMSprop_C": ["lr", "alpha", "eps", "weight_decay", "momentum", "centered", "decay", "kappa", "topC", "critical_test", "synced", "buffer_dtype"],
    "SGD_C": ["lr", "kappa", "dampening", "weight_decay", "momentum", "decay", "topC", "critical_test", "synced", "buffer_dtype"],
    "AdEMAMix": ["lr", "betas", "alpha", "beta3_warmup", "alpha_warmup", "eps", "weight_decay"],
    # No published counterpart: from_rule's class takes the rule's HYPERS order (AdEMAMix's, then the buffer's).
    "AdEMAMix_C": ["lr", "betas", "alpha", "beta3_warmup", "alpha_warmup", "eps", "weight_decay", "maximize", "foreach",
                   "kappa", "topC", "decay", "critical_test", "synced", "buffer_dtype", "aggr", "state_dtype", "rounding", "param_rounding", "seed"],
}
# A valid, non-default value for each argument, distinct across arguments where possible.
SAMPLE = {
    "lr": 0.123, "betas": (0.81, 0.982), "eps": 1e-7, "decay": 0.55, "kappa": 0.75, "topC": 3,
    "weight_decay": 0.031, "amsgrad": True, "critical_test": 0.2, "synced": False, "buffer_dtype": torch.float32,
    "state_dtype": torch.bfloat16, "rounding": "nearest", "param_rounding": "stochastic",
    "alpha": 0.93, "momentum": 0.44, "centered": True, "dampening": 0.17,
    "beta3_warmup": 17, "alpha_warmup": 19, "maximize": True, "foreach": False, "aggr": "mean", "seed": 23,
}
SPEC_DEFAULTS = {
    "SGD_C": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, kappa=1.0, topC=10, decay=0.7,
                  critical_test=0.0, synced=True, buffer_dtype=None, aggr="sum"),
    "Adam_C": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, kappa=1.0, topC=10,
                   decay=0.7, critical_test=0.0, synced=True, buffer_dtype=None, aggr="sum"),
    "RMSprop_C": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, kappa=1.0,
                      topC=10, decay=0.7, critical_test=0.0, synced=True, buffer_dtype=None, aggr="buffer"),
    "Adam_CM": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, kappa=1.0, topC=5,
                    decay=0.7, critical_test=0.0, synced=True, buffer_dtype=None, aggr="sum"),
    "AdEMAMix": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                     eps=1e-8, weight_decay=0.0),
    # with_critical_buffer's defaults over a rule without a named critical variant: topC 10, aggr "sum".
    "AdEMAMix_C": dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None, alpha_warmup=None,
                       eps=1e-8, weight_decay=0.0, maximize=False, foreach=None, kappa=1.0, topC=10, decay=0.7,
                       critical_test=0.0, synced=True, buffer_dtype=None, aggr="sum", seed=0,
                       state_dtype=None, rounding="stochastic", param_rounding="nearest"),
}


def _sample(name, arg):
    if arg == "betas" and name in ("AdEMAMix", "AdEMAMix_C"):
        return (0.81, 0.982, 0.9991)
    return SAMPLE[arg]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_published_positional_order(name):
    order = PUBLISHED_ORDER[name]
    values = [_sample(name, a) for a in order]
    opt = dropin(name)(mlp().parameters(), *values)
    group = opt.param_groups[0]
    for arg, value in zip(order, values):
        assert group[arg] == value, f"positional argument {order.index(arg)} should be {arg}"
    sig = list(inspect.signature(dropin(name)).parameters)
    assert sig[0] == "params" and sig[1:1 + len(order)] == order


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_spec_defaults(name):
    opt = dropin(name)(mlp().parameters())
    for key, value in SPEC_DEFAULTS[name].items():
        assert opt.defaults[key] == value, f"{name} default {key}"
        assert opt.param_groups[0][key] == value


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_too_many_positional_or_duplicate_arguments_raise_type_error(name):
    with pytest.raises(TypeError):
        dropin(name)(mlp().parameters(), *([0.1] * len(inspect.signature(dropin(name)).parameters)))
    with pytest.raises(TypeError, match="lr"):
        dropin(name)(mlp().parameters(), 0.1, lr=0.2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unknown_keyword_raises_type_error(name):
    with pytest.raises(TypeError, match="bogus_option"):
        dropin(name)(mlp().parameters(), lr=1e-3, bogus_option=1)
    if name not in ("AdEMAMix", "AdEMAMix_C"):
        with pytest.raises(TypeError, match="nesterov"):  # SGD's nesterov is not an argument of these
            dropin(name)(mlp().parameters(), nesterov=True)


# (argument, invalid value, text the message must contain besides the argument's name)
COMMON_INVALID = [
    ("lr", -1.0, "-1"),
    ("lr", float("nan"), "nan"),
    ("lr", "0.1", "0.1"),
    ("eps", -1e-8, "-1e-08"),
    ("weight_decay", -0.1, "-0.1"),
]
ADAM_INVALID = [
    ("betas", (1.0, 0.999), "1.0"),
    ("betas", (0.9, -0.1), "-0.1"),
    ("betas", (0.9,), "0.9"),
    ("amsgrad", "yes", "yes"),
]
CRITICAL_INVALID = [
    ("kappa", -1.0, "-1"),
    ("topC", -1, "-1"),
    ("topC", 2.5, "2.5"),
    ("decay", 1.5, "1.5"),
    ("decay", -0.1, "-0.1"),
    ("critical_test", 1.5, "1.5"),
    ("synced", "yes", "yes"),
    ("buffer_dtype", torch.int32, "int32"),
    ("aggr", "median", "median"),
]
ADEMAMIX_INVALID = [
    ("betas", (0.9, 0.999), "0.999"),
    ("betas", (0.9, 0.999, 1.0), "1.0"),
    ("alpha", -2.0, "-2"),
    ("beta3_warmup", 0, "0"),
    ("beta3_warmup", 2.5, "2.5"),
    ("alpha_warmup", -5, "-5"),
]
INVALID = {
    "Adam_CM": COMMON_INVALID + ADAM_INVALID + CRITICAL_INVALID,
    "Adam_C": COMMON_INVALID + ADAM_INVALID + CRITICAL_INVALID,
    "RMSprop_C": COMMON_INVALID + CRITICAL_INVALID + [
        ("alpha", -0.5, "-0.5"), ("momentum", -0.9, "-0.9"), ("centered", 1, "1"),
    ],
    "SGD_C": [c for c in COMMON_INVALID if c[0] != "eps"] + CRITICAL_INVALID + [
        ("momentum", -0.9, "-0.9"), ("dampening", float("inf"), "inf"),
    ],
    "AdEMAMix": COMMON_INVALID + ADEMAMIX_INVALID,
    "AdEMAMix_C": COMMON_INVALID + ADEMAMIX_INVALID + CRITICAL_INVALID + [
        ("maximize", "yes", "yes"), ("foreach", 1, "1"), ("seed", 2.5, "2.5"),
    ],
}
INVALID_CASES = [(name, arg, value, text) for name in OPTIMIZERS for arg, value, text in INVALID[name]]


def _case_id(case):
    name, arg, value, _ = case
    return f"{name}-{arg}={value!r}"


@pytest.mark.parametrize("case", INVALID_CASES, ids=[_case_id(c) for c in INVALID_CASES])
def test_invalid_hyperparameter_raises_value_error_at_construction(case):
    name, arg, value, text = case
    with pytest.raises(ValueError) as info:
        dropin(name)(mlp().parameters(), **{arg: value})
    msg = str(info.value)
    assert arg in msg, f"message does not name {arg}: {msg}"
    assert text in msg, f"message does not show the value {value!r}: {msg}"


@pytest.mark.parametrize("case", INVALID_CASES, ids=[_case_id(c) for c in INVALID_CASES])
def test_invalid_hyperparameter_in_add_param_group_raises_and_adds_nothing(case):
    name, arg, value, text = case
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    opt = dropin(name)([w1, b1], lr=1e-2)
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [w2, b2], arg: value})
    assert arg in str(info.value)
    assert len(opt.param_groups) == 1
    assert all(p is not w2 and p is not b2 for g in opt.param_groups for p in g["params"])
    # the optimizer still works, and the same params can still be added with valid values
    opt.add_param_group({"params": [w2, b2]})
    assert len(opt.param_groups) == 2
    mse(model, 0).backward()
    opt.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_extra_param_group_keys_pass_through_like_torch_optim(name):
    """Keys that are not the rule's (timm's lr_scale, torch.optim's foreach, any user key) are
    kept untouched, saved in the state_dict and loaded back, as torch.optim does."""
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    opt = dropin(name)([{"params": [w1, b1], "lr_scale": 0.5, "foreach": None}])
    opt.add_param_group({"params": [w2, b2], "my_tag": "head", "fused": False})
    assert opt.param_groups[0]["lr_scale"] == 0.5 and opt.param_groups[0]["foreach"] is None
    assert opt.param_groups[1]["my_tag"] == "head" and opt.param_groups[1]["fused"] is False
    mse(model, 0).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr_scale"] == 0.5 and sd["param_groups"][1]["my_tag"] == "head"
    twin = dropin(name)([{"params": [w1, b1]}, {"params": [w2, b2]}])
    twin.load_state_dict(sd)
    assert twin.param_groups[0]["lr_scale"] == 0.5 and twin.param_groups[1]["my_tag"] == "head"
    assert opt.param_groups[0]["lr_scale"] == 0.5  # untouched by the step


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sparse_gradient_raises_value_error(name):
    emb = nn.Embedding(6, 3, sparse=True).double()
    opt = dropin(name)(emb.parameters(), lr=1e-2)
    emb(torch.tensor([1, 4])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("name", CRITICAL)
def test_valid_edge_values_are_accepted(name):
    """decay in [0, 1] inclusive, topC == 0, kappa == 0 and critical_test == 1 are legal."""
    model = mlp()
    for kw in (dict(decay=0.0), dict(decay=1.0), dict(topC=0), dict(kappa=0.0), dict(critical_test=1.0)):
        opt = dropin(name)(model.parameters(), lr=1e-3, **kw)
        opt.zero_grad()
        mse(model, 0).backward()
        opt.step()
        assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())


def test_ademamix_c_is_the_class_from_rule_gives():
    """The AdEMAMix_C these tests drive is what from_rule makes of with_critical_buffer over AdEMAMix."""
    from memopt_func import optim, rules

    r = rules.with_critical_buffer(rules.AdEMAMix(lr=1e-2, alpha=5.0), topC=4, decay=0.9)
    opt = optim.from_rule(mlp().parameters(), r)
    assert type(opt) is dropin("AdEMAMix_C") and type(opt).__name__ == "AdEMAMix_COptimizer"
    assert opt.defaults == {**r.hyper, "differentiable": False}
