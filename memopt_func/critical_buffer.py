"""The critical buffer shared by Adam_CM, Adam_C, RMSprop_C and SGD_C.

From "Promoting Exploration in Memory-Augmented Adam using Critical Momenta" (TMLR 2024) and the
critical-gradients work it extends: a small buffer keeps the ``C = topC`` values offered with
the highest priorities ``nu`` (gradient norms), priorities decay by ``decay`` each step, and the
update uses an aggregate of the current value with the buffer's mean.

Layout (stacked so the admission decision is one batched op): ``keys [B, C]`` and ``count [B]``
with ``B = 1`` for a synced group and ``B = N`` (one row per leaf) otherwise; per leaf ``buf``
of shape ``[C, *p.shape]`` and ``buf_sum`` of ``p.shape``. Unfilled slots hold zeros and are
never read: the mean divides ``buf_sum`` by ``count``. A flat stepper on an accelerator gives
each ``buf`` one scratch row after the slots (``with_sink``), where refused elements are written.

Admission is decided on device. Where reading a value on the host costs nothing (a CPU tensor,
``slot_on_host``), ``write`` reads the chosen slot's index there, so the row is a view that one
pass reads and writes; elsewhere the index never leaves the device. The numbers are the same.

An offer is ``decide`` (once per step, for all rows), ``write`` (per leaf, over any subset of the
leaves at a time) and ``commit`` (once); ``offer`` is the three in a row.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from . import _math as M
from . import _tree, schema
from ._counter_hash import uniform
from ._slot_write import host_flags, slot_on_host, slot_sum, write  # noqa: F401  (slot_on_host: cb's public name)
from .storage import Quantized, load_codes

AGGREGATIONS = ("sum", "mean", "buffer")


@schema.declare(
    keys=schema.rows(), count=schema.rows(), offers=schema.rows(), accepted=schema.rows(), nonfinite=schema.rows(),
    buf=schema.slots(), buf_sum=schema.slot_sum(),
)
class CriticalBufferState(NamedTuple):
    """The critical buffer of a group (SPEC.md, "The critical buffer"): priorities and counters per row (one row for a synced group, one per tensor otherwise), slots and their exact sum per leaf."""

    keys: Tensor  # [B, C] priorities (float64 if any leaf is float64, else float32)
    count: Tensor  # [B] int64, slots filled
    offers: Tensor  # [B] int64, values offered so far (the critical_test draw counter)
    accepted: Tensor  # [B] int64, offers admitted so far
    nonfinite: Tensor  # [B] int64, tensors left out of an offer for a non-finite gradient norm
    buf: tuple[Tensor, ...]  # per leaf [C, *p.shape] in buffer_dtype
    buf_sum: tuple[Tensor, ...]  # per leaf p.shape in float64 (see ``write``)


def init(leaves: Sequence[Tensor], top_c: int, synced: bool, buffer_dtype: torch.dtype | None) -> CriticalBufferState:
    """Empty buffers for the leaves (top_c >= 1)."""
    device = leaves[0].device
    key_dtype = torch.float64 if any(p.dtype == torch.float64 for p in leaves) else torch.float32
    b = 1 if synced else len(leaves)
    counter = lambda: torch.zeros(b, dtype=torch.int64, device=device)  # noqa: E731
    return CriticalBufferState(
        keys=torch.zeros(b, top_c, dtype=key_dtype, device=device),
        count=counter(),
        offers=counter(),
        accepted=counter(),
        nonfinite=counter(),
        buf=tuple(torch.zeros((top_c, *p.shape), dtype=buffer_dtype or p.dtype, device=device) for p in leaves),
        buf_sum=M.zeros_like(leaves, dtype=torch.float64),
    )


def _synced(state: CriticalBufferState) -> bool:
    return state.keys.shape[0] == 1


def moved_rows(state: CriticalBufferState, idx: Sequence[int]) -> list[int]:
    """The key rows a step over leaves idx moves: the group row when synced, else the leaves' rows."""
    return [0] if _synced(state) else list(idx)


def tensor_norms(state: CriticalBufferState, grads: Sequence[Tensor], segments=None) -> Tensor:
    """[T] each tensor's gradient L2 norm, in the keys' dtype: one per leaf, or, for a leaf with
    ``segments`` runs ``((count, numel), ...)``, one per tensor it lays end to end."""
    if not segments or all(s is None for s in segments):
        return torch.stack(M.fe("norm", grads, 2, dtype=state.keys.dtype))
    if not _synced(state):
        raise ValueError("segmented (flattened) leaves need synced=True: per-tensor buffers cannot share a leaf")
    if not torch.compiler.is_compiling() and not M.is_per_tensor():
        # eager: each tensor's norm by the same multi-tensor kernel as unsegmented leaves (one
        # launch for all of them, the same bits as the tensors stepped one leaf each)
        views = [_tree.segment_views(g, runs) for g, runs in zip(grads, segments)]
        views = [v for vs in views for v in vs]
        if not views:
            return state.keys.new_zeros(1)
        return torch.stack(M.fe("norm", views, 2, dtype=state.keys.dtype))
    parts = []
    for g, runs in zip(grads, segments):
        if runs is None:
            parts.append(torch.linalg.vector_norm(g, dtype=state.keys.dtype).reshape(1))
            continue
        flat, start = g.reshape(-1), 0
        for count, numel in runs:
            block = flat[start : start + count * numel].view(count, numel)
            parts.append(torch.linalg.vector_norm(block, dim=1, dtype=state.keys.dtype))
            start += count * numel
    if not parts:  # only empty tensors: one zero norm, as the leaves' own norms would be
        return state.keys.new_zeros(1)
    return torch.cat(parts)


def priority_of(state: CriticalBufferState, norms: Tensor, finite: Tensor | None = None) -> Tensor:
    """nu per moved row from the tensors' norms: their sum when synced, else each norm. A
    non-finite norm takes no part in a synced sum (SPEC.md, "Non-finite gradients");
    ``finite``: ``M.finite(norms)`` where the caller has it already."""
    if not _synced(state):
        return norms
    return torch.where(M.finite(norms) if finite is None else finite, norms, 0).sum().reshape(1)


def priorities(state: CriticalBufferState, grads: Sequence[Tensor], segments=None) -> Tensor:
    """nu per moved row: the sum of the leaves' gradient L2 norms when synced, else each norm
    (``priority_of`` over ``tensor_norms``)."""
    return priority_of(state, tensor_norms(state, grads, segments))


def empty_rows(state: CriticalBufferState, idx: Sequence[int]) -> Tensor:
    """[len(idx)] bool: each leaf's buffer has no filled slot yet (the seeding step)."""
    empty = state.count == 0
    return empty.expand(len(idx)) if _synced(state) else _tree.rows(empty, idx)


def aggregate(state: CriticalBufferState, xs: Sequence[Tensor], idx: Sequence[int], kappa: float, aggr: str) -> list[Tensor]:
    """The buffer-augmented value of each x (before x is offered); x itself while the buffer is empty.

    ``sum``: x + kappa*mean; ``mean``: (x + kappa*buf_sum)/(count+1); ``buffer``: kappa*mean.
    """
    count = state.count.to(torch.float64)
    count = count.expand(len(idx)) if _synced(state) else _tree.rows(count, idx)
    sums = _converted(_tree.take(state.buf_sum, idx), xs)
    if aggr == "mean":
        out = M.fe("add", xs, sums, alpha=kappa)
        return M.fe("mul_", out, M.per_leaf(1.0 / (count + 1), xs))
    weight = M.per_leaf(kappa / count.clamp(min=1), sums, operand=True)  # kappa * mean = buf_sum * weight
    if aggr == "sum":
        return M.fe("addcmul", xs, sums, weight)
    empty = empty_rows(state, idx)
    on_host = host_flags(empty, xs[0]) if xs else None
    if on_host is None:
        return M.where(M.per_leaf(empty), xs, M.scale(sums, weight))
    # the flags read on the host: an empty buffer's leaf takes x itself, the others kappa * mean
    full = [k for k, e in enumerate(on_host) if not e]
    scaled = iter(M.scale(_tree.take(sums, full), _tree.take(weight, full)))
    return [xs[k] if e else next(scaled) for k, e in enumerate(on_host)]


def _converted(sums: Sequence[Tensor], xs: Sequence[Tensor]) -> list[Tensor]:
    """Each sum in its x's dtype: ``t.to(x.dtype)``, written into scratch tensors by one
    multi-tensor copy in an eager step (the same rounding)."""
    if (
        torch.compiler.is_compiling()
        or M.is_per_tensor()
        or any(t.dtype == x.dtype for t, x in zip(sums, xs))
        or (torch.is_grad_enabled() and any(t.requires_grad for t in sums))
    ):
        return [t.to(x.dtype) for t, x in zip(sums, xs)]
    out = M.scratch_list(xs, xs[0].dtype) if len({x.dtype for x in xs}) == 1 else [M.scratch_like(t, x.dtype) for t, x in zip(sums, xs)]
    torch._foreach_copy_(out, sums)
    return out


class Decision(NamedTuple):
    """An offer's outcome, decided once for the moved rows before any slot is written."""

    moved: list[int]  # the key rows the step moves
    keys: Tensor  # [R, C] the moved rows' keys after the offer
    count: Tensor  # [R]
    offers: Tensor  # [R]
    accepted: Tensor  # [R]
    nonfinite: Tensor  # [R]
    # leaf index -> (slot [1], admitted, slots filled after the offer, slot was filled before);
    # 0-d but admitted, which is one flag per element for a segmented leaf in a synced group
    leaf: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]
    # leaf index -> its position among the moved rows (0 for every leaf of a synced group): leaves
    # with the same position share one slot, which ``write`` reads on the host once
    row: dict[int, int]
    slot: Tensor  # [R] the moved rows' slots
    full: Tensor  # [R] bool, the row's buffer was full before the offer
    flags: Tensor | None  # [L] bool, each decided leaf admitted (None: some leaf has a flag per element)
    at: dict[int, int]  # leaf index -> its position among the decided leaves (in ``flags``)


def decide(
    state: CriticalBufferState,
    idx: Sequence[int],
    nu: Tensor,
    critical_test: float = 0.0,
    seed: int = 0,
    finite: Tensor | None = None,
    segments=None,
) -> Decision:
    """Where an offer with priority nu (per moved row) to the leaves idx goes, and whether it is taken.

    Not full: the next empty slot takes it. Full: the slot of the smallest key (first on ties)
    takes it iff ``nu > key`` strictly, or a counter-based draw ``u < critical_test`` says so.
    ``finite`` ([T], see ``tensor_norms``) flags the tensors whose gradient norm is finite: the
    others are left out of the slot write, and a row with no finite tensor (or a non-finite nu)
    is refused outright, so no key is ever non-finite.
    """
    top_c = state.keys.shape[1]
    moved = moved_rows(state, idx)
    synced = _synced(state)
    keys = _tree.rows(state.keys, moved)
    count = _tree.rows(state.count, moved)
    offers = _tree.rows(state.offers, moved)
    usable = M.finite(nu)
    if finite is not None and synced:
        usable = usable & finite.any().reshape(1)
    full = count >= top_c
    slot = torch.where(full, keys.argmin(dim=1), count.clamp(max=top_c - 1))
    key_at_slot = keys.gather(1, slot[:, None])[:, 0]
    admitted = ~full | (nu > key_at_slot)
    if critical_test > 0:
        # the row ids, made on device (no host-to-device copy when every row moves)
        stream = _tree.rows(torch.arange(state.keys.shape[0], device=keys.device), moved)
        admitted = admitted | (uniform(seed, offers, stream) < critical_test)
    admitted = admitted & usable
    new_key = torch.where(admitted, nu.to(keys.dtype), key_at_slot)
    # a full row stays full (count == topC); another fills a slot where admitted (count <= topC)
    filled = (count + admitted).clamp(max=top_c)
    if finite is None:
        left_out = torch.zeros_like(count)
    elif synced:
        left_out = (~finite).sum().reshape(1)
    else:
        left_out = (~finite).to(torch.int64)
    rows = [0] * len(idx) if synced else list(range(len(idx)))
    # per row, shared by the leaves of that row (every leaf of a synced group): unbound in one op each
    per_row = list(zip(slot[:, None].unbind(0), admitted.unbind(0), filled.unbind(0), full.unbind(0)))
    segmented = bool(segments) and any(runs is not None for runs in segments)
    if finite is None or not synced:
        flags = admitted if not synced else admitted.expand(len(idx))
        leaf_adm = [per_row[r][1] for r in rows]
    elif not segmented:  # one finiteness flag per leaf
        flags = admitted & finite
        leaf_adm = list(flags.unbind(0))
    else:  # a flag per element of a segmented leaf
        flags = None
        leaf_adm = [per_row[0][1] & ok for ok in _leaf_flags(finite, segments)]
    return Decision(
        moved=moved,
        keys=keys.scatter(1, slot[:, None], new_key[:, None]),
        count=filled,
        offers=offers + 1,
        accepted=_tree.rows(state.accepted, moved) + admitted,  # int64 + bool: int64
        nonfinite=_tree.rows(state.nonfinite, moved) + left_out,
        leaf={i: (per_row[r][0], adm, per_row[r][2], per_row[r][3]) for i, r, adm in zip(idx, rows, leaf_adm)},
        row=dict(zip(idx, rows)),
        slot=slot,
        full=full,
        flags=flags,
        at={i: k for k, i in enumerate(idx)},
    )


def _leaf_flags(finite: Tensor, segments) -> list[Tensor]:
    """Per leaf of a synced group, whether its tensor's norm is finite: 0-d, or one flag per
    element for a leaf with segments (its tensors' flags repeated over their elements)."""
    if not segments or all(s is None for s in segments):
        return list(finite.unbind(0))
    if not torch.compiler.is_compiling() and not M.is_per_tensor():
        # eager: each leaf's flags in one op, whatever the number of runs (no host copy: the
        # tensors' sizes are kept on the device)
        out, t = [], 0
        for runs in segments:
            if runs is None:  # a leaf of one tensor: its flag
                out.append(finite[t])
                t += 1
                continue
            sizes = _tree.sizes_on(runs, finite.device)
            out.append(finite[t : t + sizes.shape[0]].repeat_interleave(sizes, output_size=_numel(runs)))
            t += sizes.shape[0]
        return out
    out, t = [], 0
    for runs in segments:
        if runs is None:
            out.append(finite[t])
            t += 1
            continue
        parts = []
        for count, numel in runs:
            parts.append(finite[t : t + count, None].expand(count, numel).reshape(-1))
            t += count
        out.append(torch.cat(parts) if parts else finite.new_ones(0))
    return out


def _numel(runs) -> int:
    return sum(count * numel for count, numel in runs)


def map_buffers(state: Any, fn) -> Any:
    """The state with every critical buffer state in it (nested states walked) mapped by fn."""
    if isinstance(state, CriticalBufferState):
        return fn(state)
    if state is None:
        return None
    nested = {n: map_buffers(getattr(state, n), fn) for n, f in schema.of(state).items() if f.role == schema.NESTED}
    return _tree.replace(state, **nested) if nested else state


def _sums_from_slots(crit: CriticalBufferState, idx: Sequence[int], slots_of) -> list[Tensor | None]:
    """Per leaf: ``buf_sum`` summed afresh in float64 from ``slots_of(i)`` (the slots at compute
    precision), for the leaves in idx where ``slots_of(i)`` gives slots; None elsewhere."""
    top_c = crit.keys.shape[1]
    out: list[Tensor | None] = [None] * len(crit.buf_sum)
    for i in idx:
        slots = slots_of(i)
        if slots is not None:
            out[i] = slot_sum(slots, crit.count[0] if _synced(crit) else crit.count[i], top_c, torch.float64)
    return out


def decoded_sums(state: Any, idx: Sequence[int]) -> Any:
    """The state whose decoded 8-bit buffers (slots at compute precision, ``buf_sum`` stored
    narrower than float64) carry a ``buf_sum`` summed afresh from their slots in float64."""

    def fix(crit: CriticalBufferState) -> CriticalBufferState:
        if not any(s.dtype != torch.float64 for s in crit.buf_sum):
            return crit
        fresh = _sums_from_slots(crit, idx, lambda i: crit.buf[i] if crit.buf_sum[i].dtype != torch.float64 else None)
        return _tree.replace(crit, buf_sum=tuple(old if new is None else new for old, new in zip(crit.buf_sum, fresh)))

    return map_buffers(state, fix)


def stored_sums(state: Any, idx: Sequence[int], donate: bool) -> Any:
    """The stored state with each 8-bit buffer's ``buf_sum`` equal to the sum of its stored slots
    (the step's own sum has the written value before it was quantized)."""

    def fix(crit: CriticalBufferState) -> CriticalBufferState:
        if not any(isinstance(b, Quantized) for b in crit.buf):
            return crit
        top_c = crit.keys.shape[1]

        def stored_slots(i: int) -> Tensor | None:
            b, total = crit.buf[i], crit.buf_sum[i]
            return load_codes(b, "signed", (top_c, *total.shape), torch.float64, lead=1) if isinstance(b, Quantized) else None

        sums = list(crit.buf_sum)
        for i, total in enumerate(_sums_from_slots(crit, idx, stored_slots)):
            if total is not None:
                total = total.to(sums[i].dtype)
                sums[i] = sums[i].copy_(total) if donate else total
        return _tree.replace(crit, buf_sum=tuple(sums))

    return map_buffers(state, fix)


def commit(state: CriticalBufferState, decision: Decision) -> CriticalBufferState:
    """The decided keys and counters, once every slot of the offer is written."""
    moved = decision.moved
    return _tree.replace(
        state,
        keys=_tree.put_rows(state.keys, moved, decision.keys),
        count=_tree.put_rows(state.count, moved, decision.count),
        offers=_tree.put_rows(state.offers, moved, decision.offers),
        accepted=_tree.put_rows(state.accepted, moved, decision.accepted),
        nonfinite=_tree.put_rows(state.nonfinite, moved, decision.nonfinite),
    )


def offer(
    state: CriticalBufferState,
    xs: Sequence[Tensor],
    idx: Sequence[int],
    nu: Tensor,
    critical_test: float = 0.0,
    seed: int = 0,
    donate: bool = False,
) -> CriticalBufferState:
    """Offer x (priority nu per moved row) to the buffers of leaves idx: ``decide``, ``write``, ``commit``."""
    decision = decide(state, idx, nu, critical_test, seed)
    return commit(write(state, xs, idx, decision, donate), decision)


def with_sink(state: CriticalBufferState) -> CriticalBufferState:
    """The state with each ``buf`` copied into ``[C + 1, *shape]``: the slots, then a scratch row
    that ``write`` may overwrite and nothing reads. ``without_sink`` gives the ``[C]`` views back."""
    bufs = []
    for b in state.buf:
        if not isinstance(b, Tensor):  # 8-bit codes (``storage.Quantized``) are decoded for each step
            bufs.append(b)
            continue
        padded = b.new_zeros((b.shape[0] + 1, *b.shape[1:]))
        padded[: b.shape[0]].copy_(b)
        bufs.append(padded)
    return _tree.replace(state, buf=tuple(bufs))


def without_sink(state: CriticalBufferState) -> CriticalBufferState:
    """The ``[C, *shape]`` slot views of buffers that carry a sink row (the state unchanged otherwise)."""
    top_c = state.keys.shape[1]
    return _tree.replace(state, buf=tuple(b[:top_c] if isinstance(b, Tensor) else b for b in state.buf))


def decay(state: CriticalBufferState, idx: Sequence[int], factor: float | Tensor) -> CriticalBufferState:
    """keys *= factor on the rows this step moved (after the parameter update)."""
    moved = moved_rows(state, idx)
    keys = _tree.put_rows(state.keys, moved, _tree.rows(state.keys, moved) * factor)
    return _tree.replace(state, keys=keys)
