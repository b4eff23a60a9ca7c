"""A stand-in for the published cmoptimizer implementations, for speed comparisons only.

Written from SPEC.md (not from the package's code) in the published package's *structure*: one
Python loop over parameters, per-parameter buffers kept as Python lists of (priority, tensor)
with a deep copy per admission, and Python comparisons of priorities that read device values
(``float(tensor)``), which is one host sync per parameter per step. Its numbers match SPEC.md
(checked in bench/test_published_style.py); only its speed is of interest here.
"""

from __future__ import annotations

import math

import torch


class _Buffer:
    def __init__(self, top_c: int):
        self.top_c = top_c
        self.items: list[list] = []  # [priority, tensor]
        self.total = None

    def mean(self):
        return self.total / len(self.items)

    def offer(self, priority: float, value: torch.Tensor) -> None:
        value = value.detach().clone()
        if len(self.items) < self.top_c:
            self.items.append([priority, value])
            self.total = value.clone() if self.total is None else self.total + value
            return
        slot = min(range(len(self.items)), key=lambda i: self.items[i][0])
        if priority > self.items[slot][0]:
            self.total += value - self.items[slot][1]
            self.items[slot] = [priority, value]

    def decay(self, factor: float) -> None:
        for item in self.items:
            item[0] *= factor


class _PublishedStyle(torch.optim.Optimizer):
    TOP_C = 10

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, topC=None, weight_decay=0.0):
        topC = self.TOP_C if topC is None else topC
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, decay=decay, topC=topC, weight_decay=weight_decay))

    @staticmethod
    def _priority(group) -> float:
        """Sum of per-tensor gradient norms, one host read per tensor as the published code."""
        return sum(float(p.grad.norm()) for p in group["params"] if p.grad is not None)


class PublishedStyleAdamCM(_PublishedStyle):
    """Adam with critical momenta, synced priorities, per-parameter Python-side buffers."""

    TOP_C = 5

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            norm = self._priority(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["buffer"] = _Buffer(group["topC"])
                    state["buffer"].offer(norm, p.grad)
                    ma = torch.zeros_like(p)
                else:
                    state["exp_avg"].mul_(b1).add_(p.grad, alpha=1 - b1)
                    ma = state["exp_avg"] + state["buffer"].mean()
                    state["buffer"].offer(norm, state["exp_avg"])
                state["step"] += 1
                t = state["step"]
                state["exp_avg_sq"].mul_(b2).addcmul_(ma, ma, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                state["buffer"].decay(group["decay"])
                p.addcdiv_(ma, denom, value=-lr / (1 - b1**t))


class PublishedStyleAdamC(_PublishedStyle):
    """Adam with critical gradients, synced priorities, per-parameter Python-side buffers."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            norm = self._priority(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["buffer"] = _Buffer(group["topC"])
                    a = grad
                else:
                    a = grad + state["buffer"].mean()
                state["buffer"].offer(norm, grad)
                state["step"] += 1
                t = state["step"]
                if wd:
                    a = a.add(p, alpha=wd)
                state["exp_avg"].mul_(b1).add_(a, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(a, a, value=1 - b2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2**t)).add_(eps)
                state["buffer"].decay(group["decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))


class _PerParameter(torch.optim.Optimizer):
    """The published loop: the group's priority (one host read per tensor), then each parameter
    with a gradient updated on its own, its buffer made on first use."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            norm = _PublishedStyle._priority(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["buffer"] = _Buffer(group["topC"])
                self._update(p, state, group, norm)
                state["buffer"].decay(group["decay"])


class PublishedStyleSGDC(_PerParameter):
    """SGD with critical gradients (aggregate: the gradient plus the buffer's mean), synced
    priorities, per-parameter Python-side buffers; torch.optim.SGD's momentum and dampening."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, decay=0.7, topC=10):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, decay=decay, topC=topC))

    def _update(self, p, state, group, norm):
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        d = p.grad.add(p, alpha=wd) if wd else p.grad
        buffer = state["buffer"]
        a = d + buffer.mean() if buffer.items else d
        buffer.offer(norm, d)
        if mom:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = a.clone()
            else:
                state["momentum_buffer"].mul_(mom).add_(a, alpha=1 - damp)
            a = state["momentum_buffer"]
        p.add_(a, alpha=-lr)


class PublishedStyleRMSpropC(_PerParameter):
    """RMSprop with critical gradients (aggregate: the buffer's mean, the gradient itself while the
    buffer is empty), synced priorities, per-parameter Python-side buffers; plain RMSprop."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, decay=0.7, topC=10):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, decay=decay, topC=topC))

    def _update(self, p, state, group, norm):
        lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
        if "square_avg" not in state:
            state["square_avg"] = torch.zeros_like(p)
        buffer = state["buffer"]
        a = buffer.mean() if buffer.items else p.grad
        buffer.offer(norm, p.grad)
        if wd:
            a = a.add(p, alpha=wd)
        state["square_avg"].mul_(alpha).addcmul_(a, a, value=1 - alpha)
        p.addcdiv_(a, state["square_avg"].sqrt().add_(eps), value=-lr)


PUBLISHED_STYLE = {
    "Adam_CM": PublishedStyleAdamCM,
    "Adam_C": PublishedStyleAdamC,
    "SGD_C": PublishedStyleSGDC,
    "RMSprop_C": PublishedStyleRMSpropC,
}
