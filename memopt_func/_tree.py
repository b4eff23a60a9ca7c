"""Pytree plumbing shared by every rule: flatten params/grads, check they match, rebuild."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import schema


def replace(nt: Any, **changes: Any) -> Any:
    """``nt._replace(**changes)``, built by calling the class: torch 2.11's Dynamo returns a
    malformed tuple from a traced ``_replace`` (it works from torch 2.13), and every rule's step
    must trace on any supported torch."""
    unknown = set(changes) - set(nt._fields)
    if unknown:
        raise ValueError(f"{type(nt).__name__} has no field(s) {sorted(unknown)}")
    return type(nt)(*[changes[f] if f in changes else getattr(nt, f) for f in nt._fields])


def _none_is_leaf(x: Any) -> bool:
    return x is None


def flatten_params(params: Any) -> tuple[list[Tensor], pytree.TreeSpec]:
    """Leaves of a parameter pytree, checked to be dense real floating tensors on one device."""
    leaves, spec = pytree.tree_flatten(params)
    if not leaves:
        raise ValueError("params is an empty pytree: there is nothing to optimize")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise ValueError(f"params leaf {i} is a {type(leaf).__name__}, not a torch.Tensor")
        if leaf.layout != torch.strided:
            raise ValueError(f"params leaf {i} has layout {leaf.layout}; only dense (strided) parameters are supported")
        if leaf.is_complex():
            raise ValueError(
                f"params leaf {i} is complex ({leaf.dtype}); complex parameters are not supported "
                "(view them as real with torch.view_as_real)"
            )
        if not leaf.is_floating_point():
            raise ValueError(f"params leaf {i} has dtype {leaf.dtype}; parameters must be floating point")
    devices = {leaf.device for leaf in leaves}
    if len(devices) > 1:
        raise ValueError(
            f"params span several devices {sorted(map(str, devices))}; one rule instance steps "
            "tensors of one device (use one rule, or one param group, per device)"
        )
    return leaves, spec


def flatten_grads(grads: Any, spec: pytree.TreeSpec, params: Sequence[Tensor]) -> list[Tensor | None]:
    """Leaves of a gradient pytree that must have the structure of the params; None marks a skip."""
    leaves, gspec = pytree.tree_flatten(grads, is_leaf=_none_is_leaf)
    if gspec != spec:
        raise ValueError(
            "grads do not have the structure of params:\n"
            f"  params: {spec}\n  grads:  {gspec}"
        )
    check_grad_leaves(leaves, params)
    return leaves


def check_grad_leaves(leaves: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
    """Raise ValueError unless each gradient leaf is None or a dense tensor of its parameter's
    dtype, shape and device."""
    for i, (g, p) in enumerate(zip(leaves, params)):
        if g is None:
            continue
        if not isinstance(g, Tensor):
            raise ValueError(f"grads leaf {i} is a {type(g).__name__}, not a torch.Tensor or None")
        if g.layout != torch.strided:
            raise ValueError(
                f"grads leaf {i} is a sparse gradient ({g.layout}); these rules need dense gradients "
                "(convert with grad.to_dense(), or use torch.optim.SparseAdam)"
            )
        if g.dtype != p.dtype:
            raise ValueError(f"grads leaf {i} has dtype {g.dtype} but its parameter has {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads leaf {i} has shape {tuple(g.shape)} but its parameter has {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"grads leaf {i} is on {g.device} but its parameter is on {p.device}")


def check_state(state: Any, params: Sequence[Tensor], rule_name: str, quantized_fits=None) -> None:
    """Raise if a state was not made by ``init`` on parameters of these shapes.
    ``quantized_fits(entry, p, lead)`` says whether an 8-bit entry (``storage.Quantized``) fits p."""
    n = len(params)
    step = getattr(state, "step", None)
    if not isinstance(step, Tensor) or step.shape != (n,):
        raise ValueError(
            f"{rule_name} state does not match params: expected a state from init() over {n} tensors "
            f"(step of shape ({n},)), got step {None if step is None else tuple(step.shape)}"
        )
    for field, f, value in _per_leaf_fields(state):
        if len(value) != n:
            raise ValueError(f"{rule_name} state field {field!r} has {len(value)} tensors but params have {n}")
        lead = 1 if f.role == schema.SLOTS else 0
        for i, (s, p) in enumerate(zip(value, params)):
            if isinstance(s, tuple):  # 8-bit codes (``storage.Quantized``)
                if quantized_fits is None or not quantized_fits(s, p, lead=lead):
                    raise ValueError(
                        f"{rule_name} state field {field!r}[{i}] holds 8-bit codes of shape {tuple(s[0].shape)}, "
                        f"which do not fit a parameter of shape {tuple(p.shape)}"
                    )
                continue
            if tuple(s.shape[s.dim() - p.dim():]) != tuple(p.shape) or s.dim() < p.dim():
                raise ValueError(
                    f"{rule_name} state field {field!r}[{i}] has shape {tuple(s.shape)}, "
                    f"which does not fit a parameter of shape {tuple(p.shape)}"
                )


def layout_mismatch(got: Any, want: Any, path: str = "state", slots: bool = False) -> str | None:
    """Where a state's structure or shapes differ from a template state's (None if they agree).
    A critical buffer's slots (``slots``) may carry one scratch row after them (see
    ``critical_buffer.with_sink``)."""
    if isinstance(want, tuple) and hasattr(want, "_fields"):
        if type(got).__name__ != type(want).__name__:
            return f"{path} is a {type(got).__name__}, the rule keeps a {type(want).__name__}"
        roles = schema.of(want) if schema.declared(want) else {}
        for field in want._fields:
            in_slots = slots or (field in roles and roles[field].role == schema.SLOTS)
            problem = layout_mismatch(getattr(got, field), getattr(want, field), f"{path}.{field}", in_slots)
            if problem:
                return problem
        return None
    if want is None or got is None:
        if (want is None) != (got is None):
            return f"{path} is {'absent' if got is None else 'present'}, the rule {'keeps none' if want is None else 'needs one'}"
        return None
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            n = len(got) if isinstance(got, tuple) else type(got).__name__
            return f"{path} has {n} entries, the rule needs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            problem = layout_mismatch(g, w, f"{path}[{i}]", slots)
            if problem:
                return problem
        return None
    if not isinstance(got, Tensor):
        return f"{path} is a {type(got).__name__}, not a tensor"
    shape, expected = tuple(got.shape), tuple(want.shape)
    sink = slots and len(shape) == len(expected) and shape[1:] == expected[1:] and shape[0] == expected[0] + 1
    if shape != expected and not sink:
        return f"{path} has shape {shape}, the rule needs {expected}"
    return None


def _per_leaf_fields(state: Any):
    """(field, declaration, entries) for each non-empty per-leaf field, nested states walked."""
    if not schema.is_state(state):
        return
    for field, f in schema.of(state).items():
        value = getattr(state, field)
        if f.role == schema.NESTED:
            yield from _per_leaf_fields(value)
        elif isinstance(value, tuple) and value:
            yield field, f, value


def map_leaf_entries(state: Any, idx: Sequence[int], fn) -> Any:
    """The state with ``fn`` applied to the per-leaf entries (of every per-leaf field, nested
    states included) at positions idx; everything else as it was."""
    if not (isinstance(state, tuple) and hasattr(state, "_fields")):
        return state
    changes = {}
    for field in state._fields:
        value = getattr(state, field)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            changes[field] = map_leaf_entries(value, idx, fn)
        elif isinstance(value, tuple) and value:
            changes[field] = put(value, idx, [fn(value[i]) for i in idx])
    return replace(state, **changes)


def leaf_entries(state: Any, i: int) -> list[Any]:
    """The entries at position i of every per-leaf field (nested states included), in field order."""
    out = []
    for field in getattr(state, "_fields", ()):
        value = getattr(state, field)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            out.extend(leaf_entries(value, i))
        elif isinstance(value, tuple) and value:
            out.append(value[i])
    return out


def with_leaf_entries(state: Any, source: Any, i: int) -> Any:
    """state with the entries at position i of its per-leaf fields taken from source (a state
    of the same layout)."""
    if not (isinstance(state, tuple) and hasattr(state, "_fields")):
        return state
    changes = {}
    for field in state._fields:
        value, other = getattr(state, field), getattr(source, field)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            changes[field] = with_leaf_entries(value, other, i)
        elif isinstance(value, tuple) and value:
            changes[field] = put(value, [i], [other[i]])
    return replace(state, **changes)


def meta_like(params: Sequence[Tensor]) -> list[Tensor]:
    """Shape-and-dtype stand-ins on the meta device (a DTensor's global shape), to lay out a
    state without computing or allocating one."""
    return [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in params]


def unflatten(leaves: Sequence[Tensor], spec: pytree.TreeSpec) -> Any:
    return pytree.tree_unflatten(list(leaves), spec)


def take(seq: Sequence[Any], idx: Sequence[int]) -> list[Any]:
    """The entries of seq at positions idx."""
    return [seq[i] for i in idx]


def put(seq: Sequence[Any], idx: Sequence[int], values: Sequence[Any]) -> tuple[Any, ...]:
    """A copy of seq with the entries at positions idx replaced by values."""
    out = list(seq)
    for i, v in zip(idx, values):
        out[i] = v
    return tuple(out)


def rows(vec: Tensor, idx: Sequence[int]) -> Tensor:
    """vec restricted to positions idx along dim 0 (vec itself when idx covers it in order)."""
    if len(idx) == vec.shape[0] and list(idx) == list(range(vec.shape[0])):
        return vec
    return vec.index_select(0, torch.tensor(idx, device=vec.device))


def put_rows(vec: Tensor, idx: Sequence[int], values: Tensor) -> Tensor:
    """A copy of vec with rows idx replaced by values."""
    if len(idx) == vec.shape[0] and list(idx) == list(range(vec.shape[0])):
        return values
    return vec.index_copy(0, torch.tensor(idx, device=vec.device), values)


class Runs(tuple):
    """A leaf's segments ``((count, numel), ...)`` together with the positions, among the
    tensors stepped, of the tensors it lays end to end (in order). Stochastic rounding draws
    each element's bits from its tensor's position and its index in that tensor (SPEC.md,
    "Random streams"), so a flat leaf whose state is rounded that way must say them."""

    positions: tuple[int, ...]

    def __new__(cls, runs: Any, positions: Sequence[int]) -> "Runs":
        self = super().__new__(cls, tuple((int(k), int(n)) for k, n in runs))
        self.positions = tuple(int(p) for p in positions)
        if len(self.positions) != sum(k for k, _ in self):
            raise ValueError(f"{len(self.positions)} positions for {sum(k for k, _ in self)} tensors in runs {tuple(self)!r}")
        return self

    def sizes(self) -> list[int]:
        """Each tensor's number of elements, in order."""
        return [n for k, n in self for _ in range(k)]


_PLAIN_SIZES: dict[tuple, Tensor] = {}


def sizes_on(runs: Any, device: torch.device) -> Tensor:
    """Each tensor's number of elements in a leaf's segments ``runs``, as int64 on device: made
    once per layout and device, kept on a ``Runs`` (a plain tuple of runs in a module table), so
    a step makes no host-to-device copy and hashes no runs."""
    cache = runs.__dict__ if isinstance(runs, Runs) else _PLAIN_SIZES
    key = ("sizes", device) if isinstance(runs, Runs) else (tuple(runs), device)
    sizes = cache.get(key)
    if sizes is None:
        sizes = cache[key] = torch.tensor([n for k, n in runs for _ in range(k)], dtype=torch.int64, device=device)
    return sizes


def check_segments(segments: Any, leaves: Sequence[Tensor]) -> list | None:
    """Validate per-leaf runs ``((count, numel), ...)`` that tile each leaf exactly."""
    if segments is None:
        return None
    segments = list(segments)
    if len(segments) != len(leaves):
        raise ValueError(f"segments has {len(segments)} entries but params have {len(leaves)} leaves")
    for i, (runs, leaf) in enumerate(zip(segments, leaves)):
        if runs is None:
            continue
        total = sum(k * n for k, n in runs)
        if total != leaf.numel() or any(k <= 0 or n <= 0 for k, n in runs):
            raise ValueError(f"segments[{i}] = {runs!r} does not tile a leaf of {leaf.numel()} elements")
    return segments


def segment_views(leaf: Tensor, runs) -> list[Tensor]:
    """The tensors a leaf lays end to end (``runs`` ``((count, numel), ...)``, or None for the leaf
    itself), as flat views of it, in order."""
    if runs is None:
        return [leaf.reshape(-1)]
    flat, start, out = leaf.reshape(-1), 0, []
    for count, numel in runs:
        out.extend(flat[start : start + count * numel].view(count, numel).unbind(0))
        start += count * numel
    return out
