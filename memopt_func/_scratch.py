"""Temporaries of an eager step taken from buffers kept from step to step.

An eager CPU step over multi-megabyte tensors makes leaf-sized temporaries (a converted copy, a
denominator, a difference). Freshly allocated, each one costs its pages: glibc hands large blocks
back to the OS when they are freed (``mmap``, or a trim of the heap's top), so every step faults
them in again, which costs more than the arithmetic. A ``Scratch`` keeps one arena per dtype and
device and hands out consecutive slices of it; ``reset`` starts over (at each run of leaves of a
step, see ``_rule.in_parts``), so the same memory serves every run and every step, warm in cache.

The contract: a slice is valid until the next ``reset``; nothing kept beyond it may be a slice
(``holds`` tells, and ``_rule.in_parts`` copies out anything that would be). Small temporaries
(under ``min_numel`` elements) are allocated as usual: malloc serves them from its free lists.
"""

from __future__ import annotations

import torch
from torch import Tensor

_ALIGN = 16  # elements: every slice starts on a 64-byte boundary for float32 (vector loads)


class Scratch:
    """Arena-backed temporaries (see the module docstring); one per optimizer, not thread-safe."""

    def __init__(self, min_numel: int = 1 << 15) -> None:
        self.min_numel = min_numel
        self._arenas: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._used: dict[tuple[torch.device, torch.dtype], int] = {}
        self._need: dict[tuple[torch.device, torch.dtype], int] = {}
        self.handed_out = False  # whether any arena slice was given out since the last reset

    def like(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialized contiguous tensor of x's shape, in dtype (default x's)."""
        dtype = dtype or x.dtype
        numel = x.numel()
        if numel < self.min_numel:
            return torch.empty(x.shape, dtype=dtype, device=x.device)
        key = (x.device, dtype)
        start = self._used.get(key, 0)
        end = start + -(-numel // _ALIGN) * _ALIGN
        self._used[key] = end
        self._need[key] = max(self._need.get(key, 0), end)
        arena = self._arenas.get(key)
        if arena is None or end > arena.numel():  # this once from malloc; the arena grows at the next reset
            return torch.empty(x.shape, dtype=dtype, device=x.device)
        self.handed_out = True
        return arena[start : start + numel].view(x.shape)

    def reset(self) -> None:
        """Start handing out from the beginning again (every earlier slice is dead); an arena
        too small for what was asked since the last reset is made large enough."""
        for key, need in self._need.items():
            arena = self._arenas.get(key)
            if arena is None or arena.numel() < need:
                self._arenas[key] = torch.empty(need, dtype=key[1], device=key[0])
        self._used.clear()
        self.handed_out = False

    def holds(self, t: Tensor) -> bool:
        """Whether t lies in one of the arenas (then it dies at the next reset)."""
        if not self._arenas or t.numel() < self.min_numel:
            return False
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == a.untyped_storage().data_ptr() for a in self._arenas.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the arenas."""
        return sum(a.numel() * a.element_size() for a in self._arenas.values())
