"""AdEMAMix: Adam with a mixture of a fast and a slow EMA (SPEC.md, "AdEMAMix").

From "The AdEMAMix Optimizer: Better, Faster, Older" (Pagliardini, Ablin, Grangier, 2024).
``m1 = b1*m1 + (1-b1)*g`` (``m1 = g`` when ``b1 == 0``), ``m2 = beta3_t*m2 + (1-beta3_t)*g``,
``v = b2*v + (1-b2)*g*g``; ``u = (m1/(1-b1**t) + alpha_t*m2) / (sqrt(v)/sqrt(1-b2**t) + eps)
+ weight_decay*p``; ``p -= lr*u``. With ``alpha == 0`` and no alpha warmup it is AdamW exactly.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import _hyper as H
from . import _math as M
from . import _tree, schema
from ._rule import Rule, advance, new_steps
from .adam import AdamW, adam_update, init_adam
from .schedules import alpha_schedule, beta3_schedule


@schema.declare(
    step=schema.step(), exp_avg=schema.moment("signed"), exp_avg_slow=schema.moment("signed"), exp_avg_sq=schema.moment("square")
)
class AdEMAMixState(NamedTuple):
    """AdEMAMix's state: a step counter per leaf, the fast and slow EMAs and the second moment per leaf."""

    step: Tensor  # [N] float64, one counter per leaf
    exp_avg: tuple[Tensor, ...]  # m1; empty when b1 == 0
    exp_avg_slow: tuple[Tensor, ...]  # m2
    exp_avg_sq: tuple[Tensor, ...]  # v


def _per_leaf_or_scalar(x, like):
    return M.per_leaf(x, like) if isinstance(x, Tensor) and x.dim() == 1 else x


class AdEMAMix(Rule):
    """AdEMAMix, as the PyTorch reference computes it."""

    ELEMENTWISE = True

    HYPERS = (
        H.lr(1e-3),
        H.Hyper("betas", (0.9, 0.999, 0.9999), H.betas(3), dynamic=True),
        H.Hyper("alpha", 2.0, H.nonnegative),
        H.Hyper("beta3_warmup", None, H.positive_int_or_none),
        H.Hyper("alpha_warmup", None, H.positive_int_or_none),
        H.Hyper("eps", 1e-8, H.nonnegative, dynamic=True),
        H.Hyper("weight_decay", 0.0, H.nonnegative, dynamic=True),
        H.maximize(),
        H.foreach(),
        *H.storage(),
    )

    @property
    def is_adamw(self) -> bool:
        """alpha == 0 with no alpha warmup: the slow EMA never contributes, so no m2 is kept."""
        return self.hyper["alpha"] == 0 and self.hyper["alpha_warmup"] is None

    def _check_per_step(self, h):
        b1_now, b1_built = h["betas"][0], self.hyper["betas"][0]
        if not isinstance(b1_now, Tensor) and not isinstance(b1_built, Tensor) and H.zero_switched(b1_built, b1_now):
            raise ValueError(
                f"invalid betas: {h['betas']!r} (AdEMAMix was built with beta1={b1_built!r}; a per-step beta1 "
                "cannot switch between zero and non-zero, as that changes the state layout)"
            )

    def _init(self, leaves):
        if self.is_adamw:
            return init_adam(leaves, amsgrad=False)
        return AdEMAMixState(
            step=new_steps(leaves),
            exp_avg=() if M.is_zero(self.hyper["betas"][0]) else M.zeros_like(leaves),
            exp_avg_slow=M.zeros_like(leaves),
            exp_avg_sq=M.zeros_like(leaves),
        )

    def _update(self, params, grads, state, idx, h, ctx):
        b1, b2, b3 = h["betas"]
        if self.is_adamw:
            hw = {"lr": h["lr"], "betas": (b1, b2), "eps": h["eps"], "weight_decay": h["weight_decay"], "amsgrad": False}
            return adam_update(params, grads, state, idx, hw, AdamW.DECOUPLED, ctx.donate)
        lr, eps, wd = h["lr"], h["eps"], h["weight_decay"]
        step = advance(state.step, idx)
        t = _tree.rows(step, idx)
        alpha_t = _per_leaf_or_scalar(alpha_schedule(t, h["alpha"], h["alpha_warmup"]), grads)
        beta3_t = _per_leaf_or_scalar(beta3_schedule(t, b1, b3, h["beta3_warmup"]), grads)
        m1_all = state.exp_avg
        if m1_all:
            m1 = M.ema_mul_add(_tree.take(m1_all, idx), grads, b1, ctx.donate)
            m1_all = _tree.put(m1_all, idx, m1)
        else:
            m1 = grads
        m2 = M.ema_mul_add(_tree.take(state.exp_avg_slow, idx), grads, beta3_t, ctx.donate)
        v = M.ema_sq(_tree.take(state.exp_avg_sq, idx), grads, b2, ctx.donate)
        denom = M.adam_denominator(v, b2, t, eps)
        # u = (m1 / (1 - b1**t) + alpha_t * m2) / denom (+ weight_decay * p), built in one fresh tensor
        u = M.scale(m1, M.per_leaf(1 / (1 - M.power(b1, t)), grads, operand=True))
        u = M.axpy(u, alpha_t, m2, inplace=True)
        u = M.fe("div_", u, denom)
        if not M.is_zero(wd):
            u = M.axpy(u, wd, params, inplace=True)
        new_state = AdEMAMixState(
            step=step,
            exp_avg=m1_all,
            exp_avg_slow=_tree.put(state.exp_avg_slow, idx, m2),
            exp_avg_sq=_tree.put(state.exp_avg_sq, idx, v),
        )
        return M.axpy(params, -lr, u, ctx.donate), new_state
