"""The critical buffer shared by Adam_CM, Adam_C, RMSprop_C and SGD_C.

From "Promoting Exploration in Memory-Augmented Adam using Critical Momenta" (TMLR 2024) and the
critical-gradients work it extends: a small buffer keeps the ``C = topC`` values offered with
the highest priorities ``nu`` (gradient norms), priorities decay by ``decay`` each step, and the
update uses an aggregate of the current value with the buffer's mean.

Layout (stacked so the admission decision is one batched op): ``keys [B, C]`` and ``count [B]``
with ``B = 1`` for a synced group and ``B = N`` (one row per leaf) otherwise; per leaf ``buf``
of shape ``[C, *p.shape]`` and ``buf_sum`` of ``p.shape``. Unfilled slots hold zeros and are
never read: the mean divides ``buf_sum`` by ``count``. A stepper may give each ``buf`` one
scratch row after the slots (``with_sink``), where refused offers are written.

An offer is ``decide`` (once per step, for all rows), ``write`` (per leaf, over any subset of the
leaves at a time) and ``commit`` (once); ``offer`` is the three in a row.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import _math as M
from . import _tree
from ._counter_hash import uniform

AGGREGATIONS = ("sum", "mean", "buffer")


class CriticalBufferState(NamedTuple):
    keys: Tensor  # [B, C] priorities (float64 if any leaf is float64, else float32)
    count: Tensor  # [B] int64, slots filled
    offers: Tensor  # [B] int64, values offered so far (the critical_test draw counter)
    accepted: Tensor  # [B] int64, offers admitted so far
    buf: tuple[Tensor, ...]  # per leaf [C, *p.shape] in buffer_dtype
    buf_sum: tuple[Tensor, ...]  # per leaf p.shape in the parameter's dtype


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
        buf=tuple(torch.zeros((top_c, *p.shape), dtype=buffer_dtype or p.dtype, device=device) for p in leaves),
        buf_sum=M.zeros_like(leaves),
    )


def _synced(state: CriticalBufferState) -> bool:
    return state.keys.shape[0] == 1


def moved_rows(state: CriticalBufferState, idx: Sequence[int]) -> list[int]:
    """The key rows a step over leaves idx moves: the group row when synced, else the leaves' rows."""
    return [0] if _synced(state) else list(idx)


def priorities(state: CriticalBufferState, grads: Sequence[Tensor], segments=None) -> Tensor:
    """nu per moved row: the sum of the leaves' gradient L2 norms when synced, else each norm.

    A leaf with ``segments`` runs ``((count, numel), ...)`` counts as the tensors it lays end to end.
    """
    if not segments or all(s is None for s in segments):
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=state.keys.dtype))
        return norms.sum().reshape(1) if _synced(state) else norms
    if not _synced(state):
        raise ValueError("segmented (flattened) leaves need synced=True: per-tensor buffers cannot share a leaf")
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
    return torch.cat(parts).sum().reshape(1)


def empty_rows(state: CriticalBufferState, idx: Sequence[int]) -> Tensor:
    """[len(idx)] bool: each leaf's buffer has no filled slot yet (the seeding step)."""
    empty = state.count == 0
    return empty.expand(len(idx)) if _synced(state) else _tree.rows(empty, idx)


def is_empty(state: CriticalBufferState, idx: Sequence[int]) -> list[Tensor]:
    """Per present leaf, a 0-d bool: its buffer has no filled slot yet (the seeding step)."""
    return M.per_leaf(empty_rows(state, idx))


def aggregate(state: CriticalBufferState, xs: Sequence[Tensor], idx: Sequence[int], kappa: float, aggr: str) -> list[Tensor]:
    """The buffer-augmented value of each x (before x is offered); x itself while the buffer is empty.

    ``sum``: x + kappa*mean; ``mean``: (x + kappa*buf_sum)/(count+1); ``buffer``: kappa*mean.
    """
    count = state.count.to(torch.float64)
    count = count.expand(len(idx)) if _synced(state) else _tree.rows(count, idx)
    sums = _tree.take(state.buf_sum, idx)
    if aggr == "mean":
        out = list(torch._foreach_add(xs, sums, alpha=kappa))
        torch._foreach_mul_(out, M.per_leaf(1.0 / (count + 1), xs))
        return out
    weight = M.per_leaf(kappa / count.clamp(min=1), sums)  # kappa * mean = buf_sum * weight
    if aggr == "sum":
        return list(torch._foreach_addcmul(xs, sums, weight))
    return M.where(is_empty(state, idx), xs, M.scale(sums, weight))


class Decision(NamedTuple):
    """An offer's outcome, decided once for the moved rows before any slot is written."""

    moved: list[int]  # the key rows the step moves
    keys: Tensor  # [R, C] the moved rows' keys after the offer
    count: Tensor  # [R]
    offers: Tensor  # [R]
    accepted: Tensor  # [R]
    leaf: dict[int, tuple[Tensor, Tensor, Tensor]]  # leaf index -> (slot [1], admitted, was full) 0-d


def decide(
    state: CriticalBufferState, idx: Sequence[int], nu: Tensor, critical_test: float = 0.0, seed: int = 0
) -> Decision:
    """Where an offer with priority nu (per moved row) to the leaves idx goes, and whether it is taken.

    Not full: the next empty slot takes it. Full: the slot of the smallest key (first on ties)
    takes it iff ``nu > key`` strictly, or a counter-based draw ``u < critical_test`` says so.
    """
    top_c = state.keys.shape[1]
    moved = moved_rows(state, idx)
    keys = _tree.rows(state.keys, moved)
    count = _tree.rows(state.count, moved)
    offers = _tree.rows(state.offers, moved)
    full = count >= top_c
    slot = torch.where(full, keys.argmin(dim=1), count.clamp(max=top_c - 1))
    key_at_slot = keys.gather(1, slot[:, None])[:, 0]
    admitted = ~full | (nu > key_at_slot)
    if critical_test > 0:
        # the row ids, made on device (no host-to-device copy when every row moves)
        stream = _tree.rows(torch.arange(state.keys.shape[0], device=keys.device), moved)
        admitted = admitted | (uniform(seed, offers, stream) < critical_test)
    new_key = torch.where(admitted, nu.to(keys.dtype), key_at_slot)
    rows = [0] * len(idx) if _synced(state) else list(range(len(idx)))
    return Decision(
        moved=moved,
        keys=keys.scatter(1, slot[:, None], new_key[:, None]),
        count=count + (~full).to(torch.int64),
        offers=offers + 1,
        accepted=_tree.rows(state.accepted, moved) + admitted.to(torch.int64),
        leaf={i: (slot[r].reshape(1), admitted[r], full[r]) for i, r in zip(idx, rows)},
    )


def write(
    state: CriticalBufferState, xs: Sequence[Tensor], idx: Sequence[int], decision: Decision, donate: bool = False
) -> CriticalBufferState:
    """The slot writes of a decided offer of x to leaves idx (any subset of the decided leaves):
    ``buf[slot] = x`` and ``buf_sum += x - buf[slot]`` where admitted. ``donate`` writes into the
    given ``buf`` and ``buf_sum`` tensors instead of copies. A ``buf`` may carry one scratch row
    after its ``C`` slots (``[C + 1, *shape]``, see ``with_sink``): refused offers are written there."""
    top_c = state.keys.shape[1]
    new_buf, new_sum = [], []
    for x, i in zip(xs, idx):
        s, adm, was_full = decision.leaf[i]
        buf, total = state.buf[i], state.buf_sum[i]
        # the slot's value, or 0 for an unfilled slot, which is never read (a fresh copy, zeroed in place)
        replaced = buf.index_select(0, s)[0].masked_fill_(~was_full, 0)
        stored = x.to(buf.dtype)
        if buf.shape[0] > top_c:
            # A sink row after the slots takes a refused offer, so the written value never reads
            # the buffer it goes into (Inductor then writes the slot in place, with no temporary).
            target = torch.where(adm, s, top_c)
            change = torch.where(adm, _difference(stored, replaced, total.dtype), 0)
        else:
            # refused means full, so replaced is the slot's value: writing it back changes nothing
            target, stored = s, torch.where(adm, stored, replaced)
            # buf_sum + (x - replaced) when admitted; + 0 when refused
            change = _difference(stored, replaced, total.dtype)
        new_sum.append(total.add_(change) if donate else total + change)
        new_buf.append(buf.index_put_((target,), stored[None]) if donate else buf.index_put((target,), stored[None]))
    return state._replace(buf=_tree.put(state.buf, idx, new_buf), buf_sum=_tree.put(state.buf_sum, idx, new_sum))


def _difference(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a - b in dtype, written into b (a fresh temporary) when the dtypes allow."""
    if a.dtype == b.dtype == dtype:
        return torch.sub(a, b, out=b)
    return a.to(dtype) - b.to(dtype)


def commit(state: CriticalBufferState, decision: Decision) -> CriticalBufferState:
    """The decided keys and counters, once every slot of the offer is written."""
    moved = decision.moved
    return state._replace(
        keys=_tree.put_rows(state.keys, moved, decision.keys),
        count=_tree.put_rows(state.count, moved, decision.count),
        offers=_tree.put_rows(state.offers, moved, decision.offers),
        accepted=_tree.put_rows(state.accepted, moved, decision.accepted),
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
        padded = b.new_zeros((b.shape[0] + 1, *b.shape[1:]))
        padded[: b.shape[0]].copy_(b)
        bufs.append(padded)
    return state._replace(buf=tuple(bufs))


def without_sink(state: CriticalBufferState) -> CriticalBufferState:
    """The ``[C, *shape]`` slot views of buffers that carry a sink row (the state unchanged otherwise)."""
    top_c = state.keys.shape[1]
    return state._replace(buf=tuple(b[:top_c] for b in state.buf))


def decay(state: CriticalBufferState, idx: Sequence[int], factor: float | Tensor) -> CriticalBufferState:
    """keys *= factor on the rows this step moved (after the parameter update)."""
    moved = moved_rows(state, idx)
    keys = _tree.put_rows(state.keys, moved, _tree.rows(state.keys, moved) * factor)
    return state._replace(keys=keys)
