"""Sharded parameters (``torch.distributed.tensor.DTensor``, as FSDP2's ``fully_shard`` makes
them): the rules step each rank's local shard, and a tensor's priority is its *full* L2 norm.

The seam is narrow. ``Rule.init`` and ``Rule.run`` call ``localize`` / ``globalize`` around the
rule's own code, so a rule only ever sees plain tensors (the local shards, element-wise math being
the same on a shard as on the whole), and state tensors are made as DTensors sharded exactly like
their parameter (a ``[C, *shape]`` critical buffer is sharded on the parameter's dim + 1). The one
quantity that spans shards, each tensor's squared norm, is combined by ``NormReducer``: the
group's local sums of squares travel in one all-reduce per (mesh, sharded dims), after which
every rank holds the same full norms, takes the same admission decision and keeps bitwise-equal
keys and counters (plain tensors, identical on every rank).

Replicated placements (and plain tensors, as DDP has them) need no collective: their local
values are already the whole tensor.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed support
    dist, DTensor, Shard = None, None, None


def is_sharded(t: Any) -> bool:
    """Whether t is a DTensor (sharded, replicated, or a mix over a device mesh)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(leaves: Sequence[Any]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in leaves)


def local(t: Any) -> Any:
    """The rank's local tensor of a DTensor (the storage itself: in-place writes land in it)."""
    return t._local_tensor if is_sharded(t) else t


def like(value: Tensor, ref: Any, lead: int = 0) -> Any:
    """A local tensor ``[*lead dims, *local shape of ref]`` as a DTensor sharded like ``ref``
    (its shard dims moved by ``lead``); ``value`` itself when ref is not a DTensor."""
    if not is_sharded(ref):
        return value
    placements = [Shard(p.dim + lead) if isinstance(p, Shard) else p for p in ref.placements]
    shape = (*value.shape[:lead], *ref.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, ref.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def map_per_leaf(state: Any, params: Sequence[Any], fn: Callable[[Tensor, Any, int], Any]) -> Any:
    """The state with every per-leaf tensor ``s`` (a field holding one tensor per parameter)
    replaced by ``fn(s, param, lead)``, ``lead`` being the dims before the parameter's own
    (1 for a ``[C, *shape]`` buffer); other fields are kept."""
    fields = {}
    for field in state._fields:
        value = getattr(state, field)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            value = map_per_leaf(value, params, fn)
        elif isinstance(value, tuple) and len(value) == len(params) and all(isinstance(v, Tensor) for v in value):
            value = tuple(fn(s, p, s.dim() - p.dim()) for s, p in zip(value, params))
        fields[field] = value
    return type(state)(**fields)


def localize(state: Any, params: Sequence[Any]) -> Any:
    """The state with its DTensors replaced by their local tensors."""
    return map_per_leaf(state, params, lambda s, p, lead: local(s))


def globalize(state: Any, params: Sequence[Any], before: Any | None = None) -> Any:
    """Inverse of ``localize``: local per-leaf tensors wrapped as DTensors sharded like their
    parameter; where ``before`` holds a DTensor whose local tensor is the very same storage (a
    donated, in-place step), that DTensor itself."""
    if before is None:
        return map_per_leaf(state, params, lambda s, p, lead: like(s, p, lead))
    olds = {}

    def collect(s, p, lead):
        if is_sharded(s):
            olds[id(s._local_tensor)] = s
        return s

    map_per_leaf(before, params, collect)
    def rewrap(s, p, lead):
        old = olds.get(id(s))
        return old if old is not None else like(s, p, lead)

    return map_per_leaf(state, params, rewrap)


class _Plan(NamedTuple):
    groups: list[Any]  # process groups to all-reduce over, one per sharded mesh dim
    members: list[int]  # positions (in the norm vector) of the tensors sharded this way


class NormReducer:
    """Combines per-tensor local sums of squares into full ones for a list of leaves (one entry
    per tensor, in order): one all-reduce per distinct (mesh, sharded dims) among them."""

    def __init__(self, leaves: Sequence[Any]) -> None:
        plans: dict[tuple, _Plan] = {}
        for i, t in enumerate(leaves):
            if not is_sharded(t):
                continue
            dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
            if not dims:
                continue
            key = (id(t.device_mesh), dims)
            if key not in plans:
                plans[key] = _Plan([t.device_mesh.get_group(d) for d in dims], [])
            plans[key].members.append(i)
        self.plans = list(plans.values())

    def __bool__(self) -> bool:
        return bool(self.plans)

    def full_norms(self, local_norms: Tensor) -> Tensor:
        """[T] full L2 norms from the [T] local ones: sqrt(sum over shards of local norm**2)."""
        out = local_norms
        for plan in self.plans:
            idx = torch.tensor(plan.members, device=out.device)
            part = local_norms.index_select(0, idx)
            part = part * part
            for group in plan.groups:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            out = out.index_copy(0, idx, torch.sqrt(part))
        return out
