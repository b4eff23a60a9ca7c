"""SPEC.md invariant "The reductions above hold step for step" (SPEC "Degenerate settings"):

- kappa == 0 or topC == 0: no buffer is allocated and SGD_C == SGD, Adam_C == Adam,
  RMSprop_C == RMSprop, Adam_CM == AdamW (no first-step skip);
- AdEMAMix with alpha == 0 and no alpha warmup == AdamW(lr, (b1, b2), eps, weight_decay);
- SPEC.md 8.3: the critical buffer over any rule (``rules.with_critical_buffer``) with kappa == 0
  or topC == 0 is that rule exactly: "AdEMAMix+buffer" == AdEMAMix, "AdamW+buffer" == AdamW,
  "RMSprop+buffer" == RMSprop, with the base rule's drawn hyperparameters (maximize included).

Each is checked after every step against the memopt_func base rule (bit for bit: the same
numbers, exactly) and against torch.optim (float64 leaves: relative error under 1e-12;
float32: 1e-5), with hypothesis-drawn hyperparameters, per-step lr, and None gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from harness import assert_bit_identical, bit_equal, make_rule
from strategies import BASE_OF, COMBINED_BASE, COMBINED_RULES, CRITICAL_KEYS, ademamix_hypers, flat, grad_streams, lrs, rule_hypers, trees

REDUCING = ("SGD_C", "Adam_C", "RMSprop_C", "Adam_CM", "AdEMAMix") + COMBINED_RULES
_BASE_KEYS = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "RMSprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered"),
}
_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _reduction(name: str, hyper: dict) -> tuple[str, dict]:
    """The base rule and its hyperparameters that ``name`` built with ``hyper`` must equal."""
    if name == "AdEMAMix":
        b1, b2, _ = hyper["betas"]
        return "AdamW", {
            "lr": hyper["lr"], "betas": (b1, b2), "eps": hyper["eps"],
            "weight_decay": hyper["weight_decay"], "amsgrad": False,
        }
    if name in COMBINED_BASE:  # the base rule given to with_critical_buffer, as it was built
        return COMBINED_BASE[name], {k: v for k, v in hyper.items() if k not in CRITICAL_KEYS}
    base = BASE_OF[name]
    return base, {k: hyper[k] for k in _BASE_KEYS[base]}


def _torch_optimizer(base: str, tensors: list[torch.Tensor], h: dict) -> torch.optim.Optimizer | None:
    """torch.optim's ``base`` with the same arguments (None for AdEMAMix, which it lacks)."""
    if base not in _BASE_KEYS:
        return None
    cls = getattr(torch.optim, base)
    return cls(tensors, foreach=False, maximize=h.get("maximize", False), **{k: h[k] for k in _BASE_KEYS[base]})


@pytest.mark.parametrize("name", REDUCING)
@given(data=st.data())
def test_invariant_reductions_hold_step_for_step(name, data):
    """Invariant "the reductions above hold step for step": degenerate critical rules (kappa 0
    or topC 0), the combined rules "<Base>+buffer" at kappa 0 or topC 0 (SPEC 8.3) and
    AdEMAMix(alpha=0) equal their base rule, in memopt_func (bit for bit) and in torch.optim
    (to float rounding; AdEMAMix has none), after every step."""
    tree = data.draw(trees(low_precision=True), label="tree")
    if name == "AdEMAMix":
        hyper = data.draw(ademamix_hypers(alpha_zero=True), label="hyper")
        per_step = st.one_of(st.just({}), st.builds(lambda lr: {"lr": lr}, lrs))
    else:
        hyper = data.draw(rule_hypers(name, buffer=False), label="hyper")
        per_step = st.one_of(
            st.just({}),
            st.builds(lambda lr: {"lr": lr}, lrs),
            st.builds(lambda d: {"decay": d}, st.floats(0, 1)),
        )
    stream = data.draw(
        grad_streams(tree.n, max_steps=10, low_precision=tree.low_precision, per_step=per_step), label="stream"
    )
    base_name, base_hyper = _reduction(name, hyper)
    rule, base = make_rule(name, hyper), make_rule(base_name, base_hyper)

    params = tree.build()
    leaves, spec = flat(params)
    state, base_state = rule.init(params), base.init(params)
    if name != "AdEMAMix":
        assert state.critical is None, "kappa == 0 or topC == 0 must allocate no buffer"
    base_params = params
    compared = [i for i, p in enumerate(leaves) if p.dtype in _TOL]
    ref = [leaves[i].detach().clone() for i in compared]
    opt = _torch_optimizer(base_name, ref, base_hyper) if ref else None

    for k, plan in enumerate(stream):
        gleaves = plan.grads(leaves)
        grads = pytree.tree_unflatten(gleaves, spec)
        kw = plan.kwargs()
        base_kw = {k_: v for k_, v in kw.items() if k_ != "decay"}
        params, state = rule.step(params, grads, state, **kw)
        base_params, base_state = base.step(base_params, grads, base_state, **base_kw)
        leaves, base_leaves = flat(params)[0], flat(base_params)[0]
        for i, (x, y) in enumerate(zip(leaves, base_leaves)):
            assert bit_equal(x, y), f"step {k} leaf {i}: {name} != memopt_func.{base_name}\n{x}\nvs\n{y}"
        if name in COMBINED_BASE:  # the whole base state: type, layout and bits
            assert_bit_identical(state.base, base_state, f"step {k}: {name} state.base vs memopt_func.{base_name} state")
        for a, b in zip(pytree.tree_leaves(state.base if name != "AdEMAMix" else state), pytree.tree_leaves(base_state)):
            assert bit_equal(a, b), f"step {k}: {name} state != memopt_func.{base_name} state"
        if opt is None:
            continue
        for t, i in zip(ref, compared):
            t.grad = None if gleaves[i] is None else gleaves[i].clone()
        opt.param_groups[0]["lr"] = base_kw.get("lr", base_hyper["lr"])
        opt.step()
        for t, i in zip(ref, compared):
            tol = _TOL[t.dtype]
            atol = tol * (1.0 + (t.abs().max().item() if t.numel() else 0.0))
            torch.testing.assert_close(
                leaves[i], t, rtol=tol, atol=atol, equal_nan=True,
                msg=lambda m, k=k, i=i: f"step {k} leaf {i}: {name} vs torch.optim.{base_name}: {m}",
            )
