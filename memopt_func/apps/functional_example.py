"""A custom training loop with torch.func: the functional guide's example (docs/guides/functional.md), also run by the tests.

The loop owns the parameters as a plain dict; ``torch.func.grad`` of a
``torch.func.functional_call`` loss gives gradients of the same structure, and the rule's pure
``step`` returns the next parameters and state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

from ..rules import Rule


def two_spirals(n: int = 512, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic two-class spiral data set: (x [n, 2], y [n] in {0, 1})."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n // 2, generator=gen) * 3 * torch.pi + 0.5
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / (3 * torch.pi)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * (n // 2), 2, generator=gen)
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    return x, y


def small_mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))


def train_functional(rule: Rule, steps: int = 200, seed: int = 0) -> list[float]:
    """Train a small MLP on two spirals with ``rule``; returns the loss before each step."""
    model = small_mlp(seed)
    x, y = two_spirals(seed=seed)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    loss_and_grad = grad(loss_fn, has_aux=False)
    state = rule.init(params)
    losses = []
    for _ in range(steps):
        losses.append(float(loss_fn(params, x, y)))
        grads = loss_and_grad(params, x, y)
        params, state = rule.step(params, grads, state)
    return losses
