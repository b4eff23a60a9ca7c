"""Adam_CM: Adam with critical momenta (SPEC.md, "Adam_CM").

From "Promoting Exploration in Memory-Augmented Adam using Critical Momenta" (TMLR 2024).
``p *= 1 - lr*weight_decay``; first step of a buffer: seed it with ``g`` and leave ``m`` at 0
(``ma = 0``, the reference's first step moves ``p`` only by weight decay); later steps
``m = b1*m + (1-b1)*g``, ``ma = aggregate(m)``, offer ``m`` with the gradient's priority;
``v = b2*v + (1-b2)*ma*ma``; ``p -= lr/(1-b1**t) * ma / (sqrt(v)/sqrt(1-b2**t) + eps)``; keys decay.
"""

from __future__ import annotations

import torch

from . import _math as M
from . import _tree
from . import critical_buffer as cb
from ._critical import CriticalRule, critical_hypers
from ._rule import advance
from .adam import ADAM_HYPERS, AdamState, AdamW


class Adam_CM(CriticalRule):
    """Adam with critical momenta; ``kappa == 0`` or ``topC == 0`` is ``torch.optim.AdamW``."""

    BASE = AdamW
    HYPERS = ADAM_HYPERS + critical_hypers(top_c=5, aggr="sum")

    def _update_part(self, params, grads, base, crit, idx, decision, h, ctx):
        lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
        step = advance(base.step, idx)
        t = _tree.rows(step, idx)
        inplace = ctx.donate
        if not M.is_zero(wd):
            params = M.decoupled_decay(params, lr, wd, inplace)
        seeding_rows = cb.empty_rows(crit, idx)
        m = M.ema(_tree.take(base.exp_avg, idx), grads, b1, inplace)
        on_host = cb.host_flags(seeding_rows, params[0])
        if on_host is None:
            seeding = M.per_leaf(seeding_rows)
            # m stays 0 through the seeding step
            m = [M.zero_where(c, x) for c, x in zip(seeding, m)]
            offered = M.where(seeding, grads, m)
        else:  # the seeding flags read on the host: the same values, without a pass per leaf
            m = [M.zero_where(torch.ones((), dtype=torch.bool), x) if s else x for s, x in zip(on_host, m)]
            offered = [g if s else x for s, g, x in zip(on_host, grads, m)]
        # m is 0 and the buffer empty on the seeding step, so its aggregate ma is 0 as well
        ma = cb.aggregate(crit, m, idx, h["kappa"], h["aggr"])
        crit = cb.write(crit, offered, idx, decision, inplace)
        v = M.ema_sq(_tree.take(base.exp_avg_sq, idx), ma, b2, inplace)
        vmax = M.amsgrad_max(_tree.take(base.max_exp_avg_sq, idx), v, inplace) if h["amsgrad"] else ()
        # The seeding step moves p only by weight decay: its Adam step is 0 / (0 + 1), not
        # 0 / (0 + eps), which is NaN where eps underflows (float16).
        eps = M.per_leaf(M.vector(eps, seeding_rows).masked_fill(seeding_rows, 1.0), grads, operand=True)
        denom = M.adam_denominator(vmax if h["amsgrad"] else v, b2, t, eps)
        new_params = M.adam_apply(params, ma, denom, lr, b1, t, inplace)
        new_base = AdamState(
            step=step,
            exp_avg=_tree.put(base.exp_avg, idx, m),
            exp_avg_sq=_tree.put(base.exp_avg_sq, idx, v),
            max_exp_avg_sq=_tree.put(base.max_exp_avg_sq, idx, vmax) if h["amsgrad"] else (),
        )
        return new_params, new_base, crit
