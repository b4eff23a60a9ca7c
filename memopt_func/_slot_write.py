"""The critical buffer's slot writes (``write``): ``buf[slot] = x`` where an offer was admitted,
with ``buf_sum`` kept equal to the sum of the filled slots; and where the chosen slot's index can
be read (``slot_on_host``). ``critical_buffer`` decides the offer and calls these; its state and
decision types are only annotations here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from . import _math as M
from . import _tree, sharding

if TYPE_CHECKING:
    from .critical_buffer import CriticalBufferState, Decision


def write(
    state: CriticalBufferState, xs: Sequence[Tensor], idx: Sequence[int], decision: Decision, donate: bool = False
) -> CriticalBufferState:
    """The slot writes of a decided offer of x to leaves idx (any subset of the decided leaves):
    ``buf[slot] = x`` where admitted, and ``buf_sum`` kept equal to the sum of the filled slots.

    ``buf_sum`` is float64. Slots narrower than that hold values on a grid fine enough that
    ``buf_sum += x - old`` is exact in float64 while the values' magnitudes span less than about
    2**27, and off by float64 rounding of the current sum beyond: exact to the slots' own
    rounding on any run length, for four more bytes read and written per element than a sum in
    float32. float64 slots (no wider type exists) and a leaf written through a sink row (below)
    are summed afresh from the filled slots, which reads every slot.

    How the row is written depends on where the slot index can be read (``slot_on_host``):
    - on the host (a CPU tensor, eager or compiled with ``capture_scalar_outputs``): row ``s``
      is a view, read and written in one pass (eager with one flag per leaf writes nothing for
      a refused offer);
    - otherwise, a leaf with a sink row (a flat stepper's leaf on an accelerator) writes its
      refused elements there, reading nothing first;
    - otherwise row ``s`` is gathered, then written back with the offered value where admitted.
    ``donate`` writes into the given ``buf`` and ``buf_sum`` tensors instead of copies."""
    top_c = state.keys.shape[1]
    new_buf, new_sum = [], []
    slots: dict[int, Any] = {}  # the host reads made so far, by row (``Decision.row``)
    done = _write_whole_on_host(state, xs, idx, decision) if donate and not torch.compiler.is_compiling() else set()
    for x, i in zip(xs, idx):
        if i in done:  # written in place already
            new_buf.append(state.buf[i])
            new_sum.append(state.buf_sum[i])
            continue
        s, adm, filled, was_full = decision.leaf[i]
        buf, total = state.buf[i], state.buf_sum[i]
        stored = x.to(buf.dtype)
        if slot_on_host(buf):
            r = decision.row[i]
            if r not in slots:
                slots[r] = _host_index(s, top_c)
            row = slots[r]
            here = buf.narrow(0, row, 1)[0]  # (Inductor cannot lower buf[row] on some views)
            whole = donate and adm.dim() == 0 and not torch.compiler.is_compiling()
            if whole and not bool(adm):
                # eager on the host, one flag for the leaf: a refused offer writes nothing
                new_buf.append(buf)
                new_sum.append(total)
                continue
            if whole:  # ... and an admitted one writes x: the numbers of the masked write below
                adm = None
            elif adm.dim() > 0:  # one flag per element of a segmented leaf
                adm = adm.view(here.shape)
            # the sum moves before the write: ``here`` is the row itself
            summed = None if buf.dtype == torch.float64 else _running_sum(total, stored, here, adm, was_full, donate)
            value = stored if adm is None else torch.where(adm, stored, here)
            if donate:
                here.copy_(value)
                written = buf
            else:
                written = buf.slice_scatter(value[None], 0, row, row + 1)
        elif adm.dim() > 0 and buf.shape[0] > top_c:
            # A flat stepper's leaf off the host: refused elements go to the sink row, so
            # nothing reads the buffer before the write, and the write needs no temporary under
            # Inductor (a read would make it stage the written row, a leaf-sized allocation every
            # step). Indexing the 1-D leaf's buffer itself (not a view) lets it write in place.
            rows, values = (buf, stored) if buf.dim() == 2 else (buf.view(buf.shape[0], -1), stored.reshape(-1))
            index = (torch.where(adm, s, top_c), torch.arange(rows.shape[1], device=buf.device))
            written = (rows.index_put_(index, values) if donate else rows.index_put(index, values)).view(buf.shape)
            summed = None
        else:
            # Row s is read, then written with the offered value where admitted and its own
            # value elsewhere. The written value depends on the read, so a compiler keeps the
            # read first and updates the buffer in place (a read that nothing written depends on
            # may be moved after the write, which costs a copy of the whole buffer every step).
            here = buf.index_select(0, s)[0]
            if adm.dim() > 0:  # one flag per element of a segmented leaf
                adm = adm.view(here.shape)
            summed = None if buf.dtype == torch.float64 else _running_sum(total, stored, here, adm, was_full, donate)
            written = _put(buf, s, torch.where(adm, stored, here), donate)
        new_buf.append(written)
        if summed is None:
            summed = slot_sum(written, filled, top_c, total.dtype)
            summed = total.copy_(summed) if donate else summed
        new_sum.append(summed)
    return _tree.replace(state, buf=_tree.put(state.buf, idx, new_buf), buf_sum=_tree.put(state.buf_sum, idx, new_sum))


def _write_whole_on_host(state: CriticalBufferState, xs: Sequence[Tensor], idx: Sequence[int], decision: Decision) -> set[int]:
    """The donated eager writes of the leaves whose slot and one admission flag are read on the
    host (``slot_on_host``; not float64 slots, which ``write`` sums afresh): nothing for a refused
    offer; for an admitted one ``buf_sum += x - old`` (``old`` is 0 in a slot not filled before),
    then ``buf[s] = x``, in place, in a few multi-tensor ops for all such leaves. The numbers of
    ``_running_sum`` and the masked write in ``write``. Returns the leaves it took."""
    bufs = [b for b in _tree.take(state.buf, idx) if isinstance(b, Tensor)]
    if decision.flags is None or not bufs or not slot_on_host(bufs[0]):
        return set()
    top_c = state.keys.shape[1]
    # the decision on the host: three reads for all the leaves
    admitted, full, slot = decision.flags.tolist(), decision.full.tolist(), decision.slot.tolist()
    taken: set[int] = set()
    replace: tuple[list, list, list] = ([], [], [])  # (buf_sum, stored, row) where a slot is replaced
    fill: tuple[list, list, list] = ([], [], [])  # ... where an empty slot is filled
    for x, i in zip(xs, idx):
        buf = state.buf[i]
        if not isinstance(buf, Tensor) or buf.dtype == torch.float64:
            continue
        taken.add(i)
        if not admitted[decision.at[i]]:
            continue  # refused: nothing moves
        r = decision.row[i]
        if not 0 <= slot[r] < top_c:
            raise RuntimeError(f"critical buffer: slot {slot[r]} out of range for topC={top_c}")
        kind = replace if full[r] else fill
        kind[0].append(state.buf_sum[i])
        kind[1].append(x if x.dtype == buf.dtype else x.to(buf.dtype))
        kind[2].append(buf.select(0, slot[r]))
    if replace[0]:
        _move_sums(*replace, replaced=True)
    if fill[0]:
        _move_sums(*fill, replaced=False)
    return taken


def _move_sums(totals: list[Tensor], stored: list[Tensor], rows: list[Tensor], replaced: bool) -> None:
    """``total += x - old`` (``old`` the slot row's value where ``replaced``, else 0), then
    ``row = x``, in place: the multi-tensor form of ``_running_sum`` and the write."""
    if replaced:  # x - old in float64 (exact for the slots' values), then the sum moves
        change, old = M.scratch_list(stored, torch.float64), M.scratch_list(rows, torch.float64)
        torch._foreach_copy_(change, stored)
        torch._foreach_copy_(old, rows)  # widened here (a mixed-dtype sub_ would allocate it)
        torch._foreach_sub_(change, old)
        torch._foreach_add_(totals, change)
    else:  # the old value counts as 0: x widened, then added
        wide = M.scratch_list(stored, torch.float64)
        torch._foreach_copy_(wide, stored)
        torch._foreach_add_(totals, wide)
    torch._foreach_copy_(rows, stored)


def _running_sum(total: Tensor, stored: Tensor, here: Tensor, adm: Tensor | None, was_full: Tensor, donate: bool) -> Tensor:
    """``buf_sum`` after ``stored`` replaces ``here`` where admitted (everywhere for adm None;
    the old value counts as 0 in a slot not filled before)."""
    old = torch.where(was_full, here.to(total.dtype), 0)  # out of place: here may be the slot row
    change = stored.to(total.dtype) - old
    if adm is not None:
        change = torch.where(adm, change, 0)
    return total.add_(change) if donate else total + change


def slot_on_host(buf: Tensor) -> bool:
    """Whether the slot index of buf's offer is read on the host: a plain CPU tensor, stepped
    eagerly or compiled with ``torch._dynamo.config.capture_scalar_outputs`` (which the compiled
    Stepper sets on a CPU). Never on an accelerator (a host read would sync it), under a
    ``torch.func`` transform, or for a sharded tensor."""
    if buf.device.type != "cpu" or sharding.is_sharded(buf):
        return False
    if torch.compiler.is_compiling():
        return bool(torch._dynamo.config.capture_scalar_outputs)
    return torch._C._functorch.peek_interpreter_stack() is None


def host_flags(flags: Tensor, like: Tensor) -> list[bool] | None:
    """``flags`` read on the host, where an eager step may read like's values there
    (``slot_on_host``, not while compiling); None elsewhere. A step that knows a per-leaf flag
    skips element-wise work whose result the flag makes an identity."""
    if torch.compiler.is_compiling() or not slot_on_host(like):
        return None
    return flags.tolist()


def _host_index(s: Tensor, top_c: int) -> Any:
    """The slot ``s`` ([1]) as a host integer (a symbolic one under compile), checked in range."""
    row = s.item()
    torch._check(row >= 0)
    torch._check(row < top_c)
    return row


def _put(buf: Tensor, row: Tensor, value: Tensor, donate: bool) -> Tensor:
    """buf with ``buf[row] = value`` (row a [1] index), in place when donated."""
    return buf.index_put_((row,), value[None]) if donate else buf.index_put((row,), value[None])


def slot_sum(buf: Tensor, filled: Tensor, top_c: int, dtype: torch.dtype) -> Tensor:
    """The sum of the first ``filled`` slots of buf, in dtype; the others are never read."""
    # slot by slot, in order: element-wise work that a compiler fuses into one pass over the slots
    # (a reduction over the leading dim compiles to a strided loop many times slower)
    total = torch.where(filled > 0, buf[0].to(dtype), 0)
    for j in range(1, top_c):
        total = total + torch.where(filled > j, buf[j].to(dtype), 0)
    return total
