"""A counter-based uniform draw on device: pure, replayable, no host RNG.

Values live in int64 but stay below 2**32, and every product is below 2**63, so no signed
overflow happens on any backend (which keeps eager, compiled and CUDA results identical).
"""

from __future__ import annotations

from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) over int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def salt(seed: int) -> int:
    """The 32-bit salt a seed mixes into every draw (computed on the host, once per seed)."""
    return _mix32_int(seed & _MASK32) ^ _mix32_int((seed >> 32) & _MASK32 ^ 0x9E3779B9)


def uniform_salted(salt_: int | Tensor, counter: Tensor, stream: Tensor) -> Tensor:
    """``uniform`` with the seed's salt given (an int, or an int64 tensor that a compiled kernel
    takes as an input instead of a constant)."""
    h = _mix32((counter & _MASK32) ^ salt_)
    h = _mix32(h ^ (stream & _MASK32))
    return h.double() * (1.0 / 2**32)


def uniform(seed: int, counter: Tensor, stream: Tensor) -> Tensor:
    """u in [0, 1) as float64, a function of (seed, counter, stream) alone; int64 tensors broadcast."""
    return uniform_salted(salt(seed), counter, stream)
