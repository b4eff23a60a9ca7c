"""Hyperparameter declarations and their validation.

Every check raises ``ValueError`` naming the argument and the value, before any state exists.
A per-step ("dynamic") hyperparameter may also be a 0-d tensor; a tensor's value is checked
once at construction and never at step time, where reading it would force a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: name, default, checker, whether it may change per step, and whether an
    exact zero is special to the rules (another state layout, as ``momentum == 0`` keeps no
    buffer, or a cheaper form, as ``weight_decay == 0`` skips the decay). ``lr``'s zero is not:
    no zero test is made of it, so a compiled step does not recompile when a schedule reaches 0."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    dynamic: bool = False
    zero_is_special: bool = True


def _fail(name: str, value: Any, must: str) -> None:
    raise ValueError(f"invalid {name}: {value!r} ({name} must be {must})")


def _number(name: str, value: Any, must: str) -> float | Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            _fail(name, value, "a Python number or a one-element real tensor")
        return value.reshape(()) if value.dim() else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, must)
    return float(value)


def _host_value(value: float | Tensor) -> float:
    return float(value.detach().cpu()) if isinstance(value, Tensor) else value


def _is_finite(v: float) -> bool:
    """Comparisons, not ``math.isfinite``: under torch.compile a float that changes is symbolic,
    and math.isfinite of it breaks the graph, while a comparison only guards."""
    return -math.inf < v < math.inf


def zero_switched(built_with: float, now: float) -> bool:
    """Whether ``now`` is zero where ``built_with`` is not, or the other way round (a switch
    that changes a state layout). Written so that it traces when ``now`` is a symbolic float
    under torch.compile, where ``(built_with == 0) != (now == 0)`` fails."""
    return now != 0 if built_with == 0 else now == 0


def nonnegative(name: str, value: Any) -> float | Tensor:
    value = _number(name, value, "a number >= 0")
    v = _host_value(value)
    if not (v >= 0.0 and _is_finite(v)):
        _fail(name, v, "a finite number >= 0")
    return value


def finite(name: str, value: Any) -> float | Tensor:
    value = _number(name, value, "a finite number")
    if not _is_finite(_host_value(value)):
        _fail(name, _host_value(value), "a finite number")
    return value


def unit_closed(name: str, value: Any) -> float | Tensor:
    value = _number(name, value, "a number in [0, 1]")
    v = _host_value(value)
    if not (0.0 <= v <= 1.0):
        _fail(name, v, "in [0, 1]")
    return value


def unit_open(name: str, value: Any) -> float | Tensor:
    value = _number(name, value, "a number in [0, 1)")
    v = _host_value(value)
    if not (0.0 <= v < 1.0):
        _fail(name, v, "in [0, 1)")
    return value


def betas(n: int) -> Callable[[str, Any], tuple]:
    def check(name: str, value: Any) -> tuple:
        if not isinstance(value, (tuple, list)) or len(value) != n:
            _fail(name, value, f"a tuple of {n} numbers, each in [0, 1)")
        return tuple(unit_open(f"{name}[{i}]", b) for i, b in enumerate(value))

    return check


def count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(name, value, "a non-negative int")
    return value


def positive_int_or_none(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(name, value, "a positive int or None")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")
    return value


def lr(default: float) -> Hyper:
    """The learning rate: a number >= 0 (or a 0-d tensor) that may change every step, and whose
    zero is not special."""
    return Hyper("lr", default, nonnegative, dynamic=True, zero_is_special=False)


def maximize() -> Hyper:
    """torch.optim's ``maximize``: the update follows ``-grad`` (a critical buffer's priority,
    a norm, is the same either way)."""
    return Hyper("maximize", False, flag)


def foreach() -> Hyper:
    """torch.optim's ``foreach``: None chooses (multi-tensor kernels, or one op per tensor under
    ``torch.func`` transforms and when autograd records the step), False always steps tensor
    by tensor (out of place), True always uses the multi-tensor kernels."""
    return Hyper("foreach", None, flag_or_none)


def flag_or_none(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        _fail(name, value, "True, False or None")
    return value


def choice(*options: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in options:
            _fail(name, value, "one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def float_dtype_or_none(name: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        _fail(name, value, "None or a floating torch.dtype")
    return value


def int_seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "an int")
    return value


def storage() -> tuple[Hyper, ...]:
    """Storage precision (``storage``; SPEC.md, "Storage precision") and the seed of every
    counter-based draw a rule makes (stochastic rounding; a critical buffer's ``critical_test``)."""
    from . import storage as S

    return (
        Hyper("state_dtype", None, S.check_state_dtype),
        Hyper("rounding", "stochastic", choice(*S.ROUNDINGS)),
        Hyper("param_rounding", "nearest", choice(*S.ROUNDINGS)),
        Hyper("seed", 0, int_seed),
    )
