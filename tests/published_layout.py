"""Stand-ins for the published optimizers, written here from SPEC.md's description of their state
layouts (section "Migrating checkpoints from the published implementations"); neither package is
on the package index, so the migration tests run against these.

Each is a ``torch.optim.Optimizer`` whose ``state_dict()`` has exactly the published content:
param groups with the published constructor's keys only (SGD_C's empty ``gradHist`` included,
RMSprop_C without ``critical_test``), per parameter a Python-int ``step`` (none for SGD_C), the
moments under the published names, and for the cmoptimizer classes a ``"critical gradients"``
entry that is a dict subclass whose *attributes* hold the buffer: ``k``, ``curr_k``,
``decay_rate``, ``hist``, ``dtype``, ``aggr_sum`` (a running sum in the slots' dtype),
``smallest``, ``_heap_key`` ``[k]``, ``_heap_coeff`` ``[k]`` (ones, unused) and ``_heap``
``[k, *p.shape]``. Their steps follow the published loop structure (one parameter at a time,
priorities compared on the host, the buffer mean from the running sum, the published order of
operations); their numbers are SPEC.md's up to rounding.
"""

from __future__ import annotations

import copy
import io
import math
import sys
import types
from typing import ClassVar

import torch

BUFFER = "critical gradients"


class PriorityBuffer(dict):
    """The published buffer's attribute layout; the dict itself stays empty, as theirs does."""

    def __init__(self, decay_rate: float, k: int, dtype: torch.dtype | None):
        super().__init__()
        self.aggr_sum = None
        self.smallest = 0
        self.k = k
        self.curr_k = 0
        self.decay_rate = decay_rate
        self.hist = False
        self.dtype = dtype

    def __len__(self) -> int:
        return self.curr_k

    def mean(self) -> torch.Tensor:
        return self.aggr_sum / self.curr_k

    def put(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store value with priority key: the next free slot, else the slot ``smallest`` points at."""
        if self.k == 0:  # topC == 0 keeps nothing (and allocates nothing)
            return
        value = value.detach().clone()
        if self.dtype is not None:
            value = value.to(self.dtype)
        if self.curr_k == 0:
            self._heap_key = torch.zeros(self.k, dtype=key.dtype, device=key.device)
            self._heap_coeff = torch.ones(self.k, dtype=key.dtype, device=key.device)
            self._heap = torch.zeros(self.k, *value.shape, dtype=value.dtype, device=value.device)
        if self.curr_k == self.k:
            slot = self.smallest
            self.aggr_sum -= self._heap[slot]
        else:
            slot = self.curr_k
            self.curr_k += 1
        self._heap_key[slot] = key
        self._heap[slot] = value
        if self.aggr_sum is None:
            self.aggr_sum = torch.zeros_like(value)
        self.aggr_sum += value

    def offer(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Fill while not full; then replace the smallest priority if key beats it (strictly)."""
        if self.curr_k < self.k:
            self.put(key, value)
            return
        self.smallest = torch.argmin(self._heap_key)
        if key > self._heap_key[self.smallest]:
            self.put(key, value)

    def decay(self) -> None:
        self._heap_key = self._heap_key * self.decay_rate


class _PublishedCritical(torch.optim.Optimizer):
    """Shared loop: synced priority = sum of per-tensor norms of the group, else each norm."""

    DEFAULTS: ClassVar[dict] = {}

    def __init__(self, params, **kwargs):
        unknown = set(kwargs) - set(self.DEFAULTS)
        assert not unknown, unknown
        super().__init__(params, {**self.DEFAULTS, **kwargs})

    def _new_buffer(self, group) -> PriorityBuffer:
        return PriorityBuffer(group["decay"], group["topC"], group["buffer_dtype"])

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            present = [p for p in group["params"] if p.grad is not None]
            total = sum(p.grad.norm() for p in present) if group["synced"] else None
            for p in present:
                nu = total if group["synced"] else p.grad.norm()
                self._param_step(p, group, nu, self.state[p])

    def _param_step(self, p, group, nu, state):
        raise NotImplementedError


_ADAM_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, kappa=1.0, topC=10, decay=0.7,
    critical_test=0.0, synced=True, buffer_dtype=None,
)


class PublishedAdamC(_PublishedCritical):
    DEFAULTS = _ADAM_DEFAULTS

    def _param_step(self, p, group, nu, state):
        g = p.grad
        if not state or len(state[BUFFER]) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state[BUFFER] = self._new_buffer(group)
            state[BUFFER].put(nu, g)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
            a = g
        else:
            a = g + state[BUFFER].mean()
            state[BUFFER].offer(nu, g)
        _adam_tail(p, group, state, a, update_m=True)


class PublishedAdamCM(_PublishedCritical):
    DEFAULTS = {**_ADAM_DEFAULTS, "topC": 5}

    def _param_step(self, p, group, nu, state):
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        if not state or len(state[BUFFER]) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state[BUFFER] = self._new_buffer(group)
            state[BUFFER].put(nu, p.grad)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
            ma = state["exp_avg"]
        else:
            b1 = group["betas"][0]
            state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
            ma = state["exp_avg"] + state[BUFFER].mean()
            state[BUFFER].offer(nu, state["exp_avg"])
        _adam_tail(p, group, state, ma, update_m=False)


def _adam_tail(p, group, state, a, update_m):
    """Adam_C (update_m: coupled weight decay, m from a) and Adam_CM (a is the update direction)."""
    b1, b2 = group["betas"]
    state["step"] += 1
    t = state["step"]
    if update_m:
        if group["weight_decay"] != 0:
            a = a.add(p, alpha=group["weight_decay"])
        state["exp_avg"].mul_(b1).add_(a, alpha=1 - b1)
        direction = state["exp_avg"]
    else:
        direction = a
    state["exp_avg_sq"].mul_(b2).addcmul_(a, a, value=1 - b2)
    v = state["exp_avg_sq"]
    if group["amsgrad"]:
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        v = state["max_exp_avg_sq"]
    denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
    state[BUFFER].decay()
    p.addcdiv_(direction, denom, value=-group["lr"] / (1 - b1**t))


class PublishedRMSpropC(_PublishedCritical):
    DEFAULTS = dict(
        lr=1e-2, momentum=0, alpha=0.99, eps=1e-8, centered=False, weight_decay=0, kappa=1.0, topC=10, decay=0.7,
        synced=True, buffer_dtype=None,
    )

    def _param_step(self, p, group, nu, state):
        g = p.grad
        if not state or len(state[BUFFER]) == 0:
            state["step"] = 0
            state["square_avg"] = torch.zeros_like(p)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p)
            if group["centered"]:
                state["grad_avg"] = torch.zeros_like(p)
            state[BUFFER] = self._new_buffer(group)
            state[BUFFER].put(nu, g)
            a = g
        else:
            a = state[BUFFER].mean()  # the buffer's mean alone
            state[BUFFER].offer(nu, g)
        state["step"] += 1
        if group["weight_decay"] != 0:
            a = a.add(p, alpha=group["weight_decay"])
        alpha = group["alpha"]
        state["square_avg"].mul_(alpha).addcmul_(a, a, value=1 - alpha)
        if group["centered"]:
            state["grad_avg"].mul_(alpha).add_(a, alpha=1 - alpha)
            avg = state["square_avg"].addcmul(state["grad_avg"], state["grad_avg"], value=-1).sqrt_().add_(group["eps"])
        else:
            avg = state["square_avg"].sqrt().add_(group["eps"])
        state[BUFFER].decay()
        if group["momentum"] > 0:
            state["momentum_buffer"].mul_(group["momentum"]).addcdiv_(a, avg)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])
        else:
            p.addcdiv_(a, avg, value=-group["lr"])


class PublishedSGDC(_PublishedCritical):
    DEFAULTS = dict(
        lr=1e-3, kappa=1.0, dampening=0.0, weight_decay=0, momentum=0.0, decay=0.7, gradHist={}, topC=10,
        critical_test=0.0, synced=True, buffer_dtype=None,
    )

    def _param_step(self, p, group, nu, state):
        d = p.grad
        if group["weight_decay"] != 0:
            d = d.add(p, alpha=group["weight_decay"])
        if BUFFER not in state or len(state[BUFFER]) == 0:
            state[BUFFER] = self._new_buffer(group)
            state[BUFFER].put(nu, d)
            a = d
        else:
            a = d + state[BUFFER].mean()
            state[BUFFER].offer(nu, d)
        if group["decay"] != 0.0:
            state[BUFFER].decay()
        if group["momentum"] != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = a.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(a, alpha=1 - group["dampening"])
            a = state["momentum_buffer"]
        p.add_(a, alpha=-group["lr"])


class PublishedAdEMAMix(torch.optim.Optimizer):
    """The PyTorch reference's layout: ``step`` int, ``exp_avg_fast`` (None when beta1 == 0),
    ``exp_avg_slow``, ``exp_avg_sq``; groups with lr, betas, eps, alpha, the warmups, weight_decay."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, alpha=alpha, beta3_warmup=beta3_warmup,
                                      alpha_warmup=alpha_warmup, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg_fast"] = torch.zeros_like(p) if b1 != 0.0 else None
                    state["exp_avg_slow"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                alpha, warm = group["alpha"], group["alpha_warmup"]
                if warm is not None and t < warm:
                    alpha = alpha * t / warm
                beta3, warm = b3, group["beta3_warmup"]
                if warm is not None and t < warm:
                    s = t / warm
                    h = lambda b: math.log(0.5) / math.log(b + 1e-8) - 1
                    beta3 = 0.5 ** (1 / ((1 - s) * h(b1) + s * h(b3) + 1))
                if b1 != 0.0:
                    state["exp_avg_fast"].mul_(b1).add_(g, alpha=1 - b1)
                    m1 = state["exp_avg_fast"]
                else:
                    m1 = g
                state["exp_avg_slow"].mul_(beta3).add_(g, alpha=1 - beta3)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
                update = (m1 / (1 - b1**t) + alpha * state["exp_avg_slow"]) / denom
                update.add_(p, alpha=group["weight_decay"])
                p.add_(-group["lr"] * update)


PUBLISHED = {
    "Adam_C": PublishedAdamC,
    "Adam_CM": PublishedAdamCM,
    "RMSprop_C": PublishedRMSpropC,
    "SGD_C": PublishedSGDC,
    "AdEMAMix": PublishedAdEMAMix,
}


def pickled_as_cmoptimizer(sd, monkeypatch):
    """torch.save the state_dict with its buffers pickled under cmoptimizer's class name, as a
    checkpoint of the published package is; the module is gone again when it is read."""
    pkg, mod = types.ModuleType("cmoptimizer"), types.ModuleType("cmoptimizer.prioritydict")
    TensorList = type("TensorList", (PriorityBuffer,), {"__module__": "cmoptimizer.prioritydict"})
    mod.TensorList, pkg.prioritydict = TensorList, mod
    sd = copy.deepcopy(sd)
    for entry in sd["state"].values():
        entry[BUFFER].__class__ = TensorList
    f = io.BytesIO()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "cmoptimizer", pkg)
        m.setitem(sys.modules, "cmoptimizer.prioritydict", mod)
        torch.save({"optimizer": sd, "epoch": 3}, f)
    assert "cmoptimizer" not in sys.modules
    f.seek(0)
    return f
