"""Flat layout: the tensors of one (device, dtype) laid end to end in one buffer.

Stepping one flat buffer instead of N tensors keeps the compiled graph, and so the compile
time, independent of the number of tensors. Tensors are ordered by size inside a buffer so that
equal sizes form runs ``(count, numel)``: the rules take per-tensor norms over a run as one
``[count, numel]`` reduction (``Rule.step(segments=...)``), which is what keeps a synced
critical buffer's priority exactly the sum of per-tensor norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Slot:
    """Where tensor ``index`` lives: buffer ``group``, elements ``[offset, offset + numel)``."""

    index: int
    group: int
    offset: int
    numel: int
    shape: torch.Size


class FlatLayout:
    """The placement of a list of tensors in one flat buffer per (device, dtype)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        keys: list[tuple[torch.device, torch.dtype]] = []
        members: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            key = (t.device, t.dtype)
            if key not in members:
                keys.append(key)
                members[key] = []
            members[key].append(i)
        self.keys = keys
        self.slots: list[Slot | None] = [None] * len(tensors)
        self.totals: list[int] = []
        self.runs: list[tuple[tuple[int, int], ...]] = []
        for g, key in enumerate(keys):
            order = sorted(members[key], key=lambda i: tensors[i].numel())
            offset, runs = 0, []
            for i in order:
                n = tensors[i].numel()
                self.slots[i] = Slot(i, g, offset, n, tensors[i].shape)
                offset += n
                if runs and runs[-1][1] == n:
                    runs[-1][0] += 1
                else:
                    runs.append([1, n])
            self.totals.append(offset)
            self.runs.append(tuple((k, n) for k, n in runs if n > 0))

    @property
    def num_groups(self) -> int:
        return len(self.keys)

    def members(self, group: int) -> list[Slot]:
        """The slots of a buffer in buffer order."""
        return sorted((s for s in self.slots if s.group == group), key=lambda s: s.offset)

    def flatten(self, tensors: Sequence[Tensor], prefix: int = 0) -> list[Tensor]:
        """New flat buffers holding the tensors' values; ``prefix`` leading dims are kept (``[C, *shape]``)."""
        out = []
        for g in range(self.num_groups):
            parts = [tensors[s.index].reshape(*tensors[s.index].shape[:prefix], -1) for s in self.members(g)]
            out.append(torch.cat(parts, dim=prefix) if parts else parts)
        return out

    def views(self, flats: Sequence[Tensor], prefix: int = 0) -> list[Tensor]:
        """Per tensor, a view of its place in the flat buffers (shape ``[*flat.shape[:prefix], *shape]``)."""
        out = []
        for s in self.slots:
            flat = flats[s.group]
            lead = flat.shape[:prefix]
            out.append(flat.narrow(prefix, s.offset, s.numel).view(tuple(lead) + tuple(s.shape)))
        return out
