"""Flat layout: the tensors of one (device, dtype) laid end to end in one buffer.

Stepping one flat buffer instead of N tensors keeps the compiled graph, and so the compile
time, independent of the number of tensors. A compiled step orders tensors by size inside a buffer so
that equal sizes form runs ``(count, numel)``: the rules take per-tensor norms over a run as one
``[count, numel]`` reduction (``Rule.step(segments=...)``), which is what keeps a synced
critical buffer's priority exactly the sum of per-tensor norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from memopt_func import schema


@dataclass(frozen=True)
class Slot:
    """Where tensor ``index`` lives: buffer ``group``, elements ``[offset, offset + numel)``."""

    index: int
    group: int
    offset: int
    numel: int
    shape: torch.Size


class FlatLayout:
    """The placement of a list of tensors in one flat buffer per (device, dtype): ordered by size
    (``by_size``, for a compiled step's run-wise reductions) or in the order given (for an eager
    step, whose multi-tensor reductions take the tensors one by one: the same order as the
    tensors stepped one leaf each, so a sum over them rounds the same)."""

    def __init__(self, tensors: Sequence[Tensor], by_size: bool = True) -> None:
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
            order = sorted(members[key], key=lambda i: tensors[i].numel()) if by_size else members[key]
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


# ---------------------------------------------------------------- a rule state on the layout


def _map_state(state: NamedTuple, per_leaf, step) -> NamedTuple:
    """Rebuild a rule state, mapping per-leaf tuples with ``per_leaf(values, prefix)`` (``prefix``:
    leading dims before the parameter's shape, 1 for a ``[C, *shape]`` buffer) and the step
    vector with ``step``; other tensors (critical keys and counters) are kept."""

    def convert(node: Any) -> Any:
        fields = {}
        for field, f in schema.of(node).items():
            value = getattr(node, field)
            if f.role == schema.NESTED:
                value = None if value is None else convert(value)
            elif isinstance(value, tuple) and value:
                value = tuple(per_leaf(value, 1 if f.role == schema.SLOTS else 0))
            elif f.role == schema.STEP:
                value = step(value)
            fields[field] = value
        return type(node)(**fields)

    return convert(state)


def flat_state(state: NamedTuple, layout: FlatLayout) -> NamedTuple:
    """A per-tensor state rearranged onto the flat layout (values copied)."""
    return _map_state(state, layout.flatten, lambda step: _flat_steps(step, layout))


def _flat_steps(step: Tensor, layout: FlatLayout) -> Tensor:
    firsts = torch.stack([step[layout.members(g)[0].index] for g in range(layout.num_groups)])
    if not steps_agree(step, layout):
        raise ValueError(
            "cannot lay this state out flat: tensors of one group have taken different numbers of "
            "steps (some were skipped); use flat=False"
        )
    return firsts


def steps_agree(step: Tensor, layout: FlatLayout) -> bool:
    """Whether the tensors of each flat buffer have taken the same number of steps (read once,
    when a state is adopted; a meta-device state is taken to agree)."""
    if step.device.type == "meta":
        return True
    for g in range(layout.num_groups):
        members = [s.index for s in layout.members(g)]
        if not bool((step[members] == step[members[0]]).all()):
            return False
    return True


def per_tensor_steps(state: NamedTuple, layout: FlatLayout) -> NamedTuple:
    """The flat state seen per tensor, with a step vector of its own (one counter per tensor)."""
    return _map_state(state, layout.views, lambda step: torch.stack([step[s.group] for s in layout.slots]))


def per_tensor_views(state: NamedTuple, layout: FlatLayout) -> NamedTuple:
    """The flat state seen per tensor: views into the flat buffers; ``step`` as a tuple of 0-d views."""
    return _map_state(state, layout.views, lambda step: tuple(step[s.group] for s in layout.slots))
