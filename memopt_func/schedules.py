"""AdEMAMix warmup schedules as pure tensor functions of the step ``t`` (a float64 tensor).

From "The AdEMAMix Optimizer: Better, Faster, Older" (2024); evaluated at ``t`` as the PyTorch
reference does (the JAX reference uses ``t - 1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._math import power


def _log(x: float | Tensor) -> float | Tensor:
    return torch.log(x) if isinstance(x, Tensor) else math.log(x)


def alpha_schedule(t: Tensor, alpha: float | Tensor, warmup: int | None) -> float | Tensor:
    """``alpha * t / warmup`` while ``t < warmup``, else ``alpha``."""
    if warmup is None:
        return alpha
    return torch.where(t < warmup, alpha * t / warmup, alpha * torch.ones_like(t))


def _half_life(beta: float | Tensor) -> float | Tensor:
    """h(b) = ln(0.5) / ln(b + 1e-8) - 1."""
    return math.log(0.5) / _log(beta + 1e-8) - 1


def beta3_schedule(t: Tensor, beta1: float | Tensor, beta3: float | Tensor, warmup: int | None) -> float | Tensor:
    """While ``t < warmup``: ``h_inv((1-s)*h(beta1) + s*h(beta3))`` with ``s = t/warmup`` and
    ``h_inv(x) = 0.5 ** (1/(x+1))``; after: ``beta3``. (Half-life interpolation from beta1.)"""
    if warmup is None:
        return beta3
    s = t / warmup
    mixed = (1 - s) * _half_life(beta1) + s * _half_life(beta3)
    return torch.where(t < warmup, power(0.5, 1 / (mixed + 1)), beta3 * torch.ones_like(t))
