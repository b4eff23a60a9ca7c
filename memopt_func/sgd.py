"""SGD with momentum, dampening, Nesterov and weight decay, exactly as ``torch.optim.SGD``.

``d = g + weight_decay*p``; with momentum, the first step ``mb = d``, later
``mb = momentum*mb + (1-dampening)*d``, and ``d = mb`` (Nesterov: ``d + momentum*mb``);
``p -= lr*d``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import _hyper as H
from . import _math as M
from . import _tree, schema
from . import critical_buffer as cb
from ._rule import Rule, advance, new_steps


@schema.declare(step=schema.step(), momentum_buffer=schema.moment("signed"))
class SGDState(NamedTuple):
    """SGD's state: a step counter per leaf and, with momentum, a momentum buffer per leaf."""

    step: Tensor  # [N] float64, one counter per leaf
    momentum_buffer: tuple[Tensor, ...]  # empty when built with momentum == 0


SGD_HYPERS = (
    H.lr(1e-3),
    H.Hyper("momentum", 0.0, H.nonnegative, dynamic=True),
    H.Hyper("dampening", 0.0, H.finite, dynamic=True),
    H.Hyper("weight_decay", 0.0, H.nonnegative, dynamic=True),
    H.Hyper("nesterov", False, H.flag),
    H.maximize(),
    H.foreach(),
    *H.storage(),
)


def check_momentum_kept(rule_name: str, built_with: float | Tensor, now: float | Tensor) -> None:
    """The momentum buffer exists iff the rule was built with momentum != 0; keep it that way."""
    if isinstance(now, Tensor) or isinstance(built_with, Tensor):
        return
    if H.zero_switched(built_with, now):
        raise ValueError(
            f"invalid momentum: {now!r} ({rule_name} was built with momentum={built_with!r}; a per-step "
            "momentum cannot switch between zero and non-zero, as that changes the state layout)"
        )


def sgd_update(params, grads, state: SGDState, idx, h, inplace: bool = False):
    """One SGD step of the leaves at positions idx; ``inplace`` writes params and state in place."""
    lr, momentum, dampening, wd = h["lr"], h["momentum"], h["dampening"], h["weight_decay"]
    first = _tree.rows(state.step, idx) == 0
    step = advance(state.step, idx)
    d = grads if M.is_zero(wd) else M.axpy(grads, wd, params)
    buffers = state.momentum_buffer
    if buffers:
        # the scaled buffer is the state (inplace) or fresh: either may be written
        continued = M.axpy(M.scale(_tree.take(buffers, idx), momentum, inplace), 1 - dampening, d, inplace=True)
        on_host = cb.host_flags(first, params[0])
        if on_host is None:
            mb = M.where(M.per_leaf(first), d, continued, inplace)
        else:  # read on the host: the buffer starts as d on a leaf's first step, else continues
            mb = [(c.copy_(x) if inplace else x.clone()) if f else c for f, x, c in zip(on_host, d, continued)]
        buffers = _tree.put(buffers, idx, mb)
        d = M.axpy(d, momentum, mb) if h["nesterov"] else mb
    return M.axpy(params, -lr, d, inplace), SGDState(step=step, momentum_buffer=buffers)


class SGD(Rule):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

    HYPERS = SGD_HYPERS
    ELEMENTWISE = True

    def _check_combination(self, h):
        if h["nesterov"] and (M.is_zero(h["momentum"]) or not M.is_zero(h["dampening"])):
            raise ValueError(
                f"invalid nesterov: True (Nesterov momentum needs momentum > 0 and dampening == 0; got "
                f"momentum={h['momentum']!r}, dampening={h['dampening']!r})"
            )

    def _check_per_step(self, h):
        check_momentum_kept(type(self).__name__, self.hyper["momentum"], h["momentum"])

    def _init(self, leaves):
        has_buffer = not M.is_zero(self.hyper["momentum"])
        return SGDState(step=new_steps(leaves), momentum_buffer=M.zeros_like(leaves) if has_buffer else ())

    def _update(self, params, grads, state, idx, h, ctx):
        return sgd_update(params, grads, state, idx, h, ctx.donate)
