"""Running a rule's element-wise work a part at a time on a CPU, so that each part's state stays
in cache across the step's passes: consecutive leaves grouped into runs of about ``chunk_numel``
elements (``runs``), and a leaf larger than that a slice at a time (``in_parts``). The numbers
are those of the whole step at once (element-wise rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import _tree

if TYPE_CHECKING:
    from ._rule import StepContext


def check_chunk_numel(chunk_numel: Any) -> None:
    if chunk_numel is not None and (isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1):
        raise ValueError(f"invalid chunk_numel: {chunk_numel!r} (chunk_numel must be a positive int or None)")


def runs(numels: list[int], chunk_numel: int | None) -> list[list[int]]:
    """Consecutive positions grouped into runs of at least chunk_numel elements (the last may be
    short); a position of more than chunk_numel elements is a run of its own."""
    if chunk_numel is None:
        return [list(range(len(numels)))]
    parts, run, size = [], [], 0
    for j, n in enumerate(numels):
        if n > chunk_numel and run:
            parts.append(run)
            run, size = [], 0
        run.append(j)
        size += n
        if size >= chunk_numel:
            parts.append(run)
            run, size = [], 0
    return parts + [run] if run else parts


def in_parts(update, params, grads, state, idx, h, ctx: StepContext):
    """``update(params, grads, state, idx, h, ctx)`` over each of ``ctx.parts``, threading the
    state. With ``ctx.scratch`` each part starts the scratch afresh, and whatever a part returns
    that lies in it (a rule that keeps a temporary as state) is copied out first."""
    if len(ctx.parts) == 1 and not (len(idx) == 1 and _sliceable(params[0], grads[0], state, idx[0], ctx, 0)):
        return _scratch_checked(ctx.scratch, update, params, grads, state, idx, h, ctx)
    new_params = list(params)
    for part in ctx.parts:
        if len(part) == 1 and _sliceable(params[part[0]], grads[part[0]], state, idx[part[0]], ctx, part[0]):
            j = part[0]
            new_params[j], state = _in_slices(update, params[j], grads[j], state, idx[j], h, ctx)
            continue
        sub = _tree.take(idx, part)
        segments = _tree.take(ctx.segments, part) if ctx.segments else None
        moved, state = _scratch_checked(
            ctx.scratch, update, _tree.take(params, part), _tree.take(grads, part), state, sub, h,
            _tree.replace(ctx, segments=segments, parts=[list(range(len(part)))]),
        )
        for j, p in zip(part, moved):
            new_params[j] = p
    return new_params, state


def _sliceable(p: Tensor, g: Tensor, state, i: int, ctx: StepContext, j: int) -> bool:
    """Whether leaf i's element-wise work may run a slice at a time (``_in_slices``): an eager
    donated step with a scratch (so on a CPU, never compiled or transformed), a rule whose
    update is element-wise, a leaf larger than a chunk and not segmented, and every tensor of the
    leaf contiguous, so that each slice is a view the update writes in place."""
    if ctx.chunk is None or p.numel() <= ctx.chunk:
        return False
    if ctx.segments and ctx.segments[j] is not None:
        return False
    tensors = [p, g]
    for entry in _tree.leaf_entries(state, i):
        if not isinstance(entry, Tensor):  # 8-bit codes
            return False
        tensors.append(entry)
    return all(t.is_contiguous() for t in tensors)


def _in_slices(update, p: Tensor, g: Tensor, state, i: int, h, ctx: StepContext):
    """One leaf's update a slice of ``ctx.chunk`` elements at a time, in place: each slice
    sees views of the parameter, gradient and per-leaf state entries, and the state's other
    fields (step counters, keys) as they were before the step, so that they move once; they are
    taken from the first slice. Same numbers as the whole leaf at once (element-wise rules)."""
    n, chunk = p.numel(), ctx.chunk
    sub_ctx = _tree.replace(ctx, segments=None, parts=[[0]])
    first = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)

        def cut(t: Tensor, start=start, stop=stop) -> Tensor:
            return t.view(*t.shape[: t.dim() - p.dim()], n)[..., start:stop]

        views = _tree.map_leaf_entries(state, [i], cut)
        pv = p.view(-1)[start:stop]
        ctx.scratch.reset()  # what the slice returns is copied into its views below
        (new_p,), after = update([pv], [g.view(-1)[start:stop]], views, [i], h, sub_ctx)
        if new_p is not pv:
            pv.copy_(new_p)
        for view, new in zip(_tree.leaf_entries(views, i), _tree.leaf_entries(after, i)):
            if new is not view:
                view.copy_(new)
        if first is None:
            first = after
    return p, _tree.with_leaf_entries(first, state, i)


def _scratch_checked(scratch, update, params, grads, state, idx, h, ctx):
    if scratch is None:
        return update(params, grads, state, idx, h, ctx)
    scratch.reset()
    before = state
    moved, state = update(params, grads, state, idx, h, ctx)
    if not scratch.handed_out:
        return moved, state
    # what the update wrote in place is the state it was given; anything else may be a temporary
    given = {id(t) for i in idx for t in _tree.leaf_entries(before, i)} | {id(p) for p in params}
    held = lambda t: isinstance(t, Tensor) and id(t) not in given and scratch.holds(t)  # noqa: E731
    if any(held(p) for p in moved):
        moved = [p.clone() if held(p) else p for p in moved]
    if any(held(t) for i in idx for t in _tree.leaf_entries(state, i)):
        state = _tree.map_leaf_entries(state, idx, lambda t: t.clone() if held(t) else t)
    return moved, state
