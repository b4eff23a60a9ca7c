"""Adam and AdamW, exactly as ``torch.optim.Adam`` / ``torch.optim.AdamW`` compute them.

With ``t`` the leaf's step after increment:
``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g*g`` (amsgrad: ``vmax = max(vmax, v)``);
``p -= lr / (1-b1**t) * m / (sqrt(v) / sqrt(1-b2**t) + eps)``. Adam adds ``weight_decay*p`` to
``g`` first (coupled L2); AdamW multiplies ``p`` by ``1 - lr*weight_decay`` first (decoupled).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import _hyper as H
from . import _math as M
from . import _tree, schema
from ._rule import Rule, advance, new_steps


@schema.declare(step=schema.step(), exp_avg=schema.moment("signed"), exp_avg_sq=schema.moment("square"), max_exp_avg_sq=schema.moment("square"))
class AdamState(NamedTuple):
    """Adam's and AdamW's state: a step counter per leaf, the two moments (and ``max_exp_avg_sq`` with amsgrad) per leaf."""

    step: Tensor  # [N] float64, one counter per leaf
    exp_avg: tuple[Tensor, ...]
    exp_avg_sq: tuple[Tensor, ...]
    max_exp_avg_sq: tuple[Tensor, ...]  # empty unless amsgrad


ADAM_HYPERS = (
    H.lr(1e-3),
    H.Hyper("betas", (0.9, 0.999), H.betas(2), dynamic=True),
    H.Hyper("eps", 1e-8, H.nonnegative, dynamic=True),
    H.Hyper("weight_decay", 0.0, H.nonnegative, dynamic=True),
    H.Hyper("amsgrad", False, H.flag),
    H.maximize(),
    H.foreach(),
    *H.storage(),
)


def init_adam(leaves: list[Tensor], amsgrad: bool) -> AdamState:
    return AdamState(
        step=new_steps(leaves),
        exp_avg=M.zeros_like(leaves),
        exp_avg_sq=M.zeros_like(leaves),
        max_exp_avg_sq=M.zeros_like(leaves) if amsgrad else (),
    )


def adam_update(params, grads, state: AdamState, idx, h, decoupled: bool, inplace: bool = False):
    """One Adam/AdamW step of the leaves at positions idx (grads may be any pre-processed gradient);
    ``inplace`` writes params and state into the given tensors."""
    lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    step = advance(state.step, idx)
    t = _tree.rows(step, idx)
    if M.is_zero(wd):
        pass
    elif decoupled:
        params = M.decoupled_decay(params, lr, wd, inplace)
    else:
        grads = M.axpy(grads, wd, params)
    m = M.ema(_tree.take(state.exp_avg, idx), grads, b1, inplace)
    v = M.ema_sq(_tree.take(state.exp_avg_sq, idx), grads, b2, inplace)
    vmax = ()
    if h["amsgrad"]:
        vmax = M.amsgrad_max(_tree.take(state.max_exp_avg_sq, idx), v, inplace)
    denom = M.adam_denominator(vmax if h["amsgrad"] else v, b2, t, eps)
    new_params = M.adam_apply(params, m, denom, lr, b1, t, inplace)
    return new_params, AdamState(
        step=step,
        exp_avg=_tree.put(state.exp_avg, idx, m),
        exp_avg_sq=_tree.put(state.exp_avg_sq, idx, v),
        max_exp_avg_sq=_tree.put(state.max_exp_avg_sq, idx, vmax) if h["amsgrad"] else (),
    )


class Adam(Rule):
    """Adam (Kingma & Ba, 2015) with coupled L2 weight decay, as ``torch.optim.Adam``."""

    HYPERS = ADAM_HYPERS
    ELEMENTWISE = True
    DECOUPLED = False

    def _init(self, leaves):
        return init_adam(leaves, self.hyper["amsgrad"])

    def _update(self, params, grads, state, idx, h, ctx):
        return adam_update(params, grads, state, idx, h, self.DECOUPLED, ctx.donate)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as ``torch.optim.AdamW``."""

    HYPERS = tuple(
        H.Hyper("weight_decay", 1e-2, H.nonnegative, dynamic=True) if h.name == "weight_decay" else h
        for h in ADAM_HYPERS
    )
    DECOUPLED = True
