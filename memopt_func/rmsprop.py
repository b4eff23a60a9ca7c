"""RMSprop, exactly as ``torch.optim.RMSprop``.

``g = g + weight_decay*p``; ``sq = alpha*sq + (1-alpha)*g*g``; centered: ``ga = alpha*ga + (1-alpha)*g``,
``avg = sqrt(sq - ga*ga) + eps``, else ``avg = sqrt(sq) + eps``; with momentum
``mb = momentum*mb + g/avg``, ``p -= lr*mb``, else ``p -= lr*g/avg``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import _hyper as H
from . import _math as M
from . import _tree, schema
from ._rule import Rule, advance, new_steps
from .sgd import check_momentum_kept


@schema.declare(
    step=schema.step(), square_avg=schema.moment("square"), momentum_buffer=schema.moment("signed"), grad_avg=schema.moment("signed")
)
class RMSpropState(NamedTuple):
    """RMSprop's state: a step counter per leaf, the squared average (the plain average when centered, a momentum buffer with momentum) per leaf."""

    step: Tensor  # [N] float64, one counter per leaf
    square_avg: tuple[Tensor, ...]
    momentum_buffer: tuple[Tensor, ...]  # empty when built with momentum == 0
    grad_avg: tuple[Tensor, ...]  # empty unless centered


RMSPROP_HYPERS = (
    H.lr(1e-2),
    H.Hyper("alpha", 0.99, H.nonnegative, dynamic=True),
    H.Hyper("eps", 1e-8, H.nonnegative, dynamic=True),
    H.Hyper("weight_decay", 0.0, H.nonnegative, dynamic=True),
    H.Hyper("momentum", 0.0, H.nonnegative, dynamic=True),
    H.Hyper("centered", False, H.flag),
    H.maximize(),
    H.foreach(),
    *H.storage(),
)


def init_rmsprop(leaves, h) -> RMSpropState:
    return RMSpropState(
        step=new_steps(leaves),
        square_avg=M.zeros_like(leaves),
        momentum_buffer=M.zeros_like(leaves) if not M.is_zero(h["momentum"]) else (),
        grad_avg=M.zeros_like(leaves) if h["centered"] else (),
    )


def rmsprop_update(params, grads, state: RMSpropState, idx, h, inplace: bool = False):
    """One RMSprop step of the leaves at positions idx; ``inplace`` writes params and state in place."""
    lr, alpha, eps, wd = h["lr"], h["alpha"], h["eps"], h["weight_decay"]
    step = advance(state.step, idx)
    g = grads if M.is_zero(wd) else M.axpy(grads, wd, params)
    sq = M.ema_sq(_tree.take(state.square_avg, idx), g, alpha, inplace)
    grad_avg = state.grad_avg
    if h["centered"]:
        ga = M.ema(_tree.take(grad_avg, idx), g, alpha, inplace)
        grad_avg = _tree.put(grad_avg, idx, ga)
        avg = M.fe("sqrt_", M.fe("addcmul", sq, ga, ga, value=-1))
    else:
        avg = M.fe("sqrt", sq)
    avg = M.add_scalar_(avg, eps)  # avg is fresh: the rest works in place on it
    buffers = state.momentum_buffer
    if buffers:
        mb = M.scale(_tree.take(buffers, idx), h["momentum"], inplace)
        mb = M.fe("addcdiv_", mb, g, avg)
        buffers = _tree.put(buffers, idx, mb)
        new_params = M.axpy(params, -lr, mb, inplace)
    else:
        new_params = M.addcdiv(params, g, avg, -lr, inplace)
    new_state = RMSpropState(
        step=step, square_avg=_tree.put(state.square_avg, idx, sq), momentum_buffer=buffers, grad_avg=grad_avg
    )
    return new_params, new_state


class RMSprop(Rule):
    """RMSprop (Hinton, 2012; centered form of Graves, 2013), as ``torch.optim.RMSprop``."""

    HYPERS = RMSPROP_HYPERS
    ELEMENTWISE = True

    def _check_per_step(self, h):
        check_momentum_kept(type(self).__name__, self.hyper["momentum"], h["momentum"])

    def _init(self, leaves):
        return init_rmsprop(leaves, self.hyper)

    def _update(self, params, grads, state, idx, h, ctx):
        return rmsprop_update(params, grads, state, idx, h, ctx.donate)
