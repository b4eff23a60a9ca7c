"""Temporaries of an eager step taken from buffers kept from step to step.

An eager CPU step over multi-megabyte tensors makes leaf-sized temporaries (a converted copy, a
denominator, a difference). Freshly allocated, each one costs its pages: glibc hands large blocks
back to the OS when they are freed (``mmap``, or a trim of the heap's top), so every step faults
them in again, which costs more than the arithmetic. A ``Scratch`` keeps one arena per dtype and
device and hands out consecutive slices of it; ``reset`` starts over (at each run of leaves of a
step, see ``_parts.in_parts``), so the same memory serves every run and every step, warm in cache.

The contract: a slice is valid until the next ``reset``; nothing kept beyond it may be a slice
(``holds`` tells, and ``_parts.in_parts`` copies out anything that would be). A temporary under
``min_numel`` elements is allocated as usual (malloc serves it from its free lists), unless it
is carved from a large block (``_math.scratch_list``: one block for many small tensors).
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
        self._ranges: list[tuple[int, int]] = []  # the arenas' address ranges

    def like(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialized contiguous tensor of x's shape, in dtype (default x's)."""
        return self.empty(x.shape, dtype or x.dtype, x.device)

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized contiguous tensor: a slice of the arena, or from malloc when small."""
        numel = 1
        for n in shape:
            numel *= n
        if numel < self.min_numel:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (torch.device(device), dtype)
        start = self._used.get(key, 0)
        end = start + -(-numel // _ALIGN) * _ALIGN
        self._used[key] = end
        self._need[key] = max(self._need.get(key, 0), end)
        arena = self._arenas.get(key)
        if arena is None or end > arena.numel():  # this once from malloc; the arena grows at the next reset
            return torch.empty(shape, dtype=dtype, device=device)
        self.handed_out = True
        return arena[start : start + numel].view(shape)

    def reset(self) -> None:
        """Start handing out from the beginning again (every earlier slice is dead); an arena
        too small for what was asked since the last reset is made large enough."""
        for key, need in self._need.items():
            arena = self._arenas.get(key)
            if arena is None or arena.numel() < need:
                self._arenas[key] = torch.empty(need, dtype=key[1], device=key[0])
                self._ranges = [(a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()) for a in self._arenas.values()]
        self._used.clear()
        self.handed_out = False

    def holds(self, t: Tensor) -> bool:
        """Whether t lies in one of the arenas (then it dies at the next reset)."""
        if not self._ranges:
            return False
        ptr = t.data_ptr()
        return any(start <= ptr < end for start, end in self._ranges)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arenas."""
        return sum(a.numel() * a.element_size() for a in self._arenas.values())
