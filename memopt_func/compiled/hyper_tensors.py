"""A compiled step's per-step hyperparameters (learning rate, betas, ...): held in persistent 0-d
float64 tensors, so a new value is written into them and never recompiles the step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


# Per-step hyperparameters whose zero drops a term from the step (torch.optim's
# ``if weight_decay != 0``): a Python zero stays a constant, so the graph has no such term; a
# later non-zero value makes it a tensor and recompiles once.
ZERO_IS_CONSTANT = {"weight_decay"}


def as_tensor(value: Any, device: torch.device, keep_zero: bool = False) -> Any:
    """A per-step hyperparameter as the compiled step takes it: a persistent 0-d float64 tensor
    (or a zero constant, with keep_zero)."""
    if isinstance(value, tuple):
        return tuple(as_tensor(v, device) for v in value)
    if device.type == "meta":  # no values to hold: the step takes the number itself
        return value
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=torch.float64).clone()
    if keep_zero and value == 0:
        return 0.0
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def hold(target: Any, value: Any, device: torch.device, keep_zero: bool = False) -> Any:
    """target (a persistent tensor, a zero constant, or a tuple of them) holding value from now on."""
    if isinstance(target, tuple):
        return tuple(hold(t, v, device) for t, v in zip(target, value))
    if device.type == "meta":
        return value
    if isinstance(target, Tensor):
        target.copy_(value) if isinstance(value, Tensor) else target.fill_(value)
        return target
    return as_tensor(value, device, keep_zero)


def same_number(held: Any, value: Any) -> bool:
    """Whether value is the same plain number (or tuple of them) as held: an int or float of the
    same type and equal value (so never a tensor, and never NaN)."""
    if isinstance(value, tuple):
        return isinstance(held, tuple) and len(held) == len(value) and all(map(same_number, held, value))
    return type(value) in (int, float) and type(held) is type(value) and held == value


def kinds(value: Any) -> Any:
    return tuple(kinds(v) for v in value) if isinstance(value, tuple) else isinstance(value, Tensor)
