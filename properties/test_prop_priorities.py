"""SPEC.md "Priority of a step", differentially: ``critical_buffer.priorities`` on leaves that lay
several tensors end to end (``segments``, what a flat ``compiled.Stepper`` passes) equals the
priority of the same tensors as separate leaves, and both equal a float64 hand computation.

Synced: ``nu = sum_i ||g_i||_2`` over the tensors, not the norm of their concatenation (a run
of equal-sized tensors is one ``[count, numel]`` reduction, and must still give one norm per
tensor). Per-tensor rows (synced=False): each tensor's own norm. The tensors' scales differ by
up to twelve decades, so a sum of norms and a norm of the sum disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memopt_func import critical_buffer as cb
from strategies import shape_lists

# Relative tolerance per key dtype: the norms are reduced in a different order with and
# without segments, and the reference is float64.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@dataclass(frozen=True)
class PriorityCase:
    """Tensors (shapes, one dtype, per-tensor log10 scales, a value seed) and a segment layout:
    ``groups`` are consecutive tensor index ranges, each laid end to end as one leaf; a group's
    ``runs`` are ``((count, numel), ...)``, or None for a single tensor passed as it is."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    log10_scales: tuple[float | None, ...]  # None: an all-zero gradient
    seed: int
    groups: tuple[tuple[int, int], ...]
    runs: tuple[tuple[tuple[int, int], ...] | None, ...]

    def grads(self) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for shape, u in zip(self.shapes, self.log10_scales):
            g = torch.randn(shape, dtype=torch.float64, generator=gen)
            out.append((g * (0.0 if u is None else 10.0**u)).to(self.dtype))
        return out

    def leaves(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The grads laid end to end per group (a group with runs None is its one tensor)."""
        out = []
        for (a, b), runs in zip(self.groups, self.runs):
            out.append(grads[a] if runs is None else torch.cat([g.reshape(-1) for g in grads[a:b]]))
        return out


def _runs_of(numels: list[int], split) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive equal sizes (zero-size tensors take no elements and no run); ``split``
    may cut a run of equal sizes into several (a layout is free to)."""
    runs: list[list[int]] = []
    for n in numels:
        if n == 0:
            continue
        if runs and runs[-1][1] == n and not split():
            runs[-1][0] += 1
        else:
            runs.append([1, n])
    return tuple((k, n) for k, n in runs)


@st.composite
def priority_cases(draw) -> PriorityCase:
    shapes = tuple(draw(shape_lists(min_leaves=1, max_leaves=8, runs=True)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    width = 3.0 if dtype == torch.bfloat16 else 6.0
    scales = tuple(
        None if draw(st.integers(0, 9)) == 0 else draw(st.floats(-width, width)) for _ in shapes
    )
    cuts = sorted(draw(st.sets(st.integers(1, len(shapes) - 1))) if len(shapes) > 1 else set())
    groups = tuple(zip([0, *cuts], [*cuts, len(shapes)]))
    runs = []
    for a, b in groups:
        numels = [math.prod(s) for s in shapes[a:b]]
        if b - a == 1 and draw(st.booleans()):
            runs.append(None)
        else:
            runs.append(_runs_of(numels, lambda: draw(st.integers(0, 3)) == 0))
    # at least one tensor with elements (the priority of nothing but empty tensors is moot)
    assume(any(r != () for r in runs))
    return PriorityCase(shapes, dtype, scales, draw(st.integers(0, 2**31 - 1)), groups, tuple(runs))


def _norm64(g: torch.Tensor) -> float:
    """||g||_2 by hand: float64 squares, an exactly rounded sum."""
    return math.sqrt(math.fsum(x * x for x in g.double().reshape(-1).tolist()))


def _key_dtype(case: PriorityCase) -> torch.dtype:
    return torch.float64 if case.dtype == torch.float64 else torch.float32


# cheap examples (no rule step): four times the profile's count
@settings(max_examples=4 * settings().max_examples)
@given(case=priority_cases())
def test_synced_priority_with_segments_equals_sum_of_per_tensor_norms(case):
    """Synced rows: ``priorities(leaves laid end to end, segments)`` == ``priorities(separate
    leaves)`` == ``sum_i ||g_i||`` (float64 by hand), to the keys' rounding."""
    grads = case.grads()
    leaves = case.leaves(grads)
    separate = cb.priorities(cb.init(grads, 1, True, None), grads)
    segmented = cb.priorities(cb.init(leaves, 1, True, None), leaves, list(case.runs))
    want = sum(_norm64(g) for g in grads)
    assert separate.dtype == segmented.dtype == _key_dtype(case)
    assert tuple(segmented.shape) == (1,) and tuple(separate.shape) == (1,)
    rtol = RTOL[_key_dtype(case)]
    got_seg, got_sep = segmented.item(), separate.item()
    assert abs(got_seg - want) <= rtol * want, (
        f"with segments {list(case.runs)}: nu = {got_seg!r}, sum of per-tensor norms = {want!r}"
    )
    assert abs(got_sep - want) <= rtol * want, f"separate leaves: nu = {got_sep!r}, sum of per-tensor norms = {want!r}"
    assert abs(got_seg - got_sep) <= rtol * want


@settings(max_examples=4 * settings().max_examples)
@given(case=priority_cases())
def test_per_tensor_priorities_are_each_tensors_norm(case):
    """Per-tensor rows (synced=False): ``priorities`` is ``[||g_i||]`` in the keys' dtype, one
    per leaf in order (float64 by hand, to the keys' rounding)."""
    grads = case.grads()
    got = cb.priorities(cb.init(grads, 1, False, None), grads)
    assert got.dtype == _key_dtype(case) and tuple(got.shape) == (len(grads),)
    rtol = RTOL[_key_dtype(case)]
    for i, (g, nu) in enumerate(zip(grads, got.tolist())):
        want = _norm64(g)
        assert abs(nu - want) <= rtol * want, f"tensor {i} {tuple(g.shape)}: nu = {nu!r}, ||g|| = {want!r}"
