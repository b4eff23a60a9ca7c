"""Shared pieces of the drop-in optimizer tests (tests/test_dropin_*.py).

A small MLP, a deterministic data stream indexed by step, and a driver that steps a drop-in
optimizer and the functional rule it wraps side by side on the very same gradients.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from memopt_func import optim as O
from memopt_func import registry
from memopt_func._critical import CriticalRule
from memopt_func import rules

# AdEMAMix_C: rules.with_critical_buffer over AdEMAMix, as a drop-in through optim.from_rule's class
# (optim.optimizer_class(rules.critical_class(rules.AdEMAMix))); it has no published counterpart.
# Every registered optimizer's drop-in (``memopt_func.registry``), and AdEMAMix_C.
OPTIMIZERS = tuple(registry.NAMED) + ("AdEMAMix_C",)
CRITICAL = tuple(n for n in OPTIMIZERS if n == "AdEMAMix_C" or issubclass(registry.NAMED[n].rule, CriticalRule))
# Per-step ("dynamic") fields of each critical state entry that belong to the whole group when synced.
GROUP_KEYS = ("critical_keys", "critical_count", "critical_offers", "critical_accepted")


def dropin(name: str) -> type[torch.optim.Optimizer]:
    if name == "AdEMAMix_C":
        return O.optimizer_class(rules.critical_class(rules.AdEMAMix))
    return getattr(O, name)


def rule(name: str) -> type:
    if name == "AdEMAMix_C":
        return rules.critical_class(rules.AdEMAMix)
    return getattr(rules, name)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64, sizes=(4, 8, 3)) -> nn.Module:
    """Linear -> Tanh -> Linear, weights drawn from a fixed generator (same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model.to(dtype)


def batch(k: int, dtype: torch.dtype = torch.float64, n: int = 16, sizes=(4, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression minibatch of step k: x [n, 4], y [n, 3]."""
    gen = torch.Generator().manual_seed(10_000 + k)
    x = torch.randn(n, sizes[0], generator=gen, dtype=torch.float64)
    y = torch.randn(n, sizes[1], generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def mse(model: nn.Module, k: int) -> torch.Tensor:
    p0 = next(model.parameters())
    x, y = batch(k, p0.dtype)
    return ((model(x) - y) ** 2).mean()


def snapshot_state(opt: torch.optim.Optimizer) -> dict:
    """A deep copy of the optimizer's per-parameter state (keyed by parameter position)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: v.clone() for k, v in opt.state.get(p, {}).items()} for i, p in enumerate(params)}


def assert_state_equal(a: dict, b: dict, what: str = "state", only: Callable[[str], bool] | None = None) -> None:
    assert a.keys() == b.keys(), f"{what}: parameters differ"
    for i in a:
        keys = [k for k in a[i] if only is None or only(k)]
        assert set(keys) == {k for k in b[i] if only is None or only(k)}, f"{what}[{i}]: keys differ"
        for k in keys:
            x, y = a[i][k], b[i][k]
            assert x.dtype == y.dtype and x.shape == y.shape, f"{what}[{i}][{k}]: dtype/shape differ"
            assert torch.equal(x, y), f"{what}[{i}][{k}] differs"


def expected_state(rule_obj, state, n: int) -> list[dict[str, torch.Tensor]]:
    """The functional state laid out per parameter as the drop-in stores it."""
    return O.explode(state, n, bool(rule_obj.hyper.get("synced", False)))


def assert_params_equal(params_a, params_b, what: str) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert a.dtype == b.dtype, f"{what}: param {i} dtype {a.dtype} vs {b.dtype}"
        assert torch.equal(a.detach(), b.detach()), (
            f"{what}: param {i} differs, max abs diff {(a.detach() - b.detach()).abs().max().item():.3e}"
        )


def run_side_by_side(
    name: str,
    kwargs: dict[str, Any],
    steps: int = 30,
    dtype: torch.dtype = torch.float64,
    skip: Callable[[int, int], bool] | None = None,
    check_state: bool = True,
) -> None:
    """Step the drop-in on an MLP and the functional rule on a copy of its parameters with the
    same gradients; params (and state) must be bit-identical after every step.

    ``skip(k, i)``: parameter i has no gradient at step k (``.grad = None``; the rule gets None).
    """
    model = mlp(dtype=dtype)
    params = list(model.parameters())
    opt = dropin(name)(params, **kwargs)
    r = rule(name)(**kwargs)
    fparams = [p.detach().clone() for p in params]
    fstate = r.init(fparams)
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        mse(model, k).backward()
        grads = [p.grad.detach().clone() for p in params]
        if skip is not None:
            for i, p in enumerate(params):
                if skip(k, i):
                    p.grad = None
                    grads[i] = None
        opt.step()
        fparams, fstate = r.step(fparams, grads, fstate)
        assert_params_equal(params, fparams, f"{name}{kwargs} step {k}")
        if check_state:
            want = expected_state(r, fstate, len(params))
            for i, p in enumerate(params):
                got = opt.state[p]
                assert set(got) == set(want[i]), f"step {k} param {i}: state keys {sorted(got)} vs {sorted(want[i])}"
                for key in want[i]:
                    assert got[key].dtype == want[i][key].dtype, f"step {k} param {i} {key}: dtype"
                    assert torch.equal(got[key], want[i][key]), f"step {k} param {i} {key} differs"


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


# ---- save / resume -------------------------------------------------------------------------------------

RESUME_STEPS = 15
# (name, kwargs, k): save after k steps. k < topC saves mid-fill; k < the AdEMAMix warmups saves mid-warmup.
RESUME_CONFIGS = [
    ("Adam_CM", dict(lr=1e-2, topC=5), 2),
    ("Adam_CM", dict(lr=1e-2, topC=3, synced=False, amsgrad=True, weight_decay=0.1, critical_test=0.3), 7),
    ("Adam_C", dict(lr=1e-2, topC=6, buffer_dtype=torch.float32, aggr="mean"), 3),
    ("Adam_C", dict(lr=1e-2, topC=4, synced=False, weight_decay=0.05), 1),
    ("RMSprop_C", dict(lr=1e-3, topC=4, centered=True, synced=False), 1),
    ("RMSprop_C", dict(lr=1e-3, topC=3, critical_test=0.4, seed=7), 5),
    ("SGD_C", dict(lr=1e-2, topC=5, critical_test=0.5, decay=0.9), 4),
    ("SGD_C", dict(lr=1e-2, topC=4, synced=False, buffer_dtype=torch.float16, weight_decay=0.01), 2),
    ("AdEMAMix", dict(lr=1e-2, beta3_warmup=12, alpha_warmup=9), 4),
    ("AdEMAMix", dict(lr=1e-2, beta3_warmup=20, weight_decay=0.1, alpha=4.0), 6),
    ("AdEMAMix_C", dict(lr=1e-2, topC=5, beta3_warmup=12, alpha_warmup=9), 3),
    ("AdEMAMix_C", dict(lr=1e-2, topC=3, synced=False, aggr="mean", critical_test=0.3, seed=5, weight_decay=0.1), 6),
]
# Configurations whose drop-in needs state built from a non-default momentum / beta1 (resumed in-process only).
RESUME_CONFIGS_EXTRA = [
    ("SGD_C", dict(lr=1e-2, topC=4, momentum=0.9, dampening=0.1), 2),
    ("RMSprop_C", dict(lr=1e-3, topC=4, momentum=0.5), 3),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.999), beta3_warmup=10), 3),
    ("AdEMAMix_C", dict(lr=1e-2, topC=4, betas=(0.0, 0.999, 0.999), buffer_dtype=torch.float32), 2),
]


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    """Steps start..stop-1 of the shared regression stream."""
    for k in range(start, stop):
        opt.zero_grad(set_to_none=True)
        mse(model, k).backward()
        opt.step()


def resume_from(name: str, kwargs: dict, checkpoint: dict, start: int, stop: int = RESUME_STEPS):
    """A fresh model (other initial weights) and optimizer (other lr), both loaded from the checkpoint,
    trained from step ``start`` to ``stop``."""
    model = mlp(seed=99)
    model.load_state_dict(checkpoint["model"])
    opt = dropin(name)(model.parameters(), **{**kwargs, "lr": 0.5})
    opt.load_state_dict(checkpoint["opt"])
    train(model, opt, start, stop)
    return model, opt
