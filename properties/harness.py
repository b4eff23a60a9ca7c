"""Helpers shared by the property tests: running a rule over a stream, bit-level comparison."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from hypothesis import event
from torch import Tensor

from memopt_func import rules
from strategies import COMBINED_BASE, CRITICAL_KEYS, StepPlan, TreePlan, flat

_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

def tree_map(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """Map fn over the tensors of nested NamedTuples/tuples/lists/dicts (other leaves kept)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tree_map(fn, v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    return x


def tensors_with_paths(x: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a nested structure, for readable failure messages."""
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return [p for f, v in zip(x._fields, x) for p in tensors_with_paths(v, f"{path}.{f}")]
    if isinstance(x, (tuple, list)):
        return [p for i, v in enumerate(x) for p in tensors_with_paths(v, f"{path}[{i}]")]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in tensors_with_paths(v, f"{path}[{k!r}]")]
    return [(path, x)]


def clone(x: Any) -> Any:
    return tree_map(lambda t: t.clone(), x)


def bits(t: Tensor) -> Tensor:
    """The raw bit pattern of a tensor (so NaN == NaN and -0.0 != 0.0)."""
    if t.is_floating_point():
        return t.contiguous().view(_INT_OF[t.element_size()])
    return t


def bit_equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_bit_identical(a: Any, b: Any, what: str) -> None:
    """Two nested structures have the same layout, types, dtypes, shapes and bits."""
    pa, pb = tensors_with_paths(a), tensors_with_paths(b)
    assert [p for p, _ in pa] == [p for p, _ in pb], f"{what}: structures differ"
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    for (path, x), (_, y) in zip(pa, pb):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            assert isinstance(x, Tensor) and isinstance(y, Tensor), f"{what}{path}: tensor vs {type(y).__name__}"
            assert bit_equal(x, y), f"{what}{path}: not bit-identical\n{x}\nvs\n{y}"
        else:
            assert x == y, f"{what}{path}: {x!r} != {y!r}"


def make_rule(name: str, hyper: dict):
    """The rule a suite name stands for, built with ``hyper``. A combined name ("AdamW+buffer",
    see ``strategies.COMBINED_BASE``) is ``rules.with_critical_buffer(Base(**base part),
    **critical part)``, the critical part being the ``CRITICAL_KEYS`` present in ``hyper``."""
    if name in COMBINED_BASE:
        base = rules.RULES[COMBINED_BASE[name]](**{k: v for k, v in hyper.items() if k not in CRITICAL_KEYS})
        return rules.with_critical_buffer(base, **{k: v for k, v in hyper.items() if k in CRITICAL_KEYS})
    return rules.RULES[name](**hyper)


@dataclass
class Record:
    """One step of a run: leaves before/after (rule order), the gradient leaves, states."""

    k: int
    plan: StepPlan
    params_before: list[Tensor]
    grads: list[Tensor | None]
    state_before: Any
    params_after: list[Tensor]
    state_after: Any


def run_stream(rule, tree: TreePlan, stream: list[StepPlan], *, state: Any = None, params: Any = None) -> list[Record]:
    """Step rule over the stream from fresh (or given) params/state, recording every step."""
    params = tree.build() if params is None else params
    state = rule.init(params) if state is None else state
    leaves, spec = flat(params)
    records = []
    for k, plan in enumerate(stream):
        gleaves = plan.grads(leaves)
        new_params, new_state = rule.step(params, pytree.tree_unflatten(gleaves, spec), state, **plan.kwargs())
        new_leaves, _ = flat(new_params)
        records.append(Record(k, plan, leaves, gleaves, state, new_leaves, new_state))
        params, state, leaves = new_params, new_state, new_leaves
    return records


def rows_moved(synced: bool, present: tuple[bool, ...]) -> list[int]:
    """The key rows a step moves: the group row when synced (if anything is present), else the
    rows of the present leaves."""
    if synced:
        return [0] if any(present) else []
    return [i for i, h in enumerate(present) if h]


def row_of(synced: bool, leaf: int) -> int:
    return 0 if synced else leaf


def nu_reference(grads: list[Tensor | None], synced: bool) -> dict[int, float]:
    """SPEC's priority per moved row, in float64: sum of the present leaves' L2 norms (synced),
    or each leaf's own norm."""
    norms = {i: torch.linalg.vector_norm(g.double()).item() for i, g in enumerate(grads) if g is not None}
    if synced:
        return {0: sum(norms.values())} if norms else {}
    return norms


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# --------------------------------------------------------------------------- admissions and refusals


def full_buffer_choices(before: Any, after: Any, rows: list[int]) -> tuple[int, int]:
    """(admitted, refused): the offers to a *full* row among ``rows``, from two critical buffer
    states one offer apart. Offers to a row that is still filling are always admitted and say
    nothing about the comparison of priorities, so they are not counted."""
    top_c = before.keys.shape[1]
    admitted = refused = 0
    for r in rows:
        if int(before.count[r]) >= top_c and int(after.offers[r]) > int(before.offers[r]):
            took = int(after.accepted[r]) - int(before.accepted[r])
            admitted, refused = admitted + took, refused + 1 - took
    return admitted, refused


@dataclass
class AdmissionMix:
    """How many of a property's examples saw a full buffer both admit and refuse.

    SPEC.md: "Every property that involves admission sees both admissions and refusals in its
    examples." A property wrapped in ``sees_admissions_and_refusals`` reports each example's
    counts with ``note``; once hypothesis has run every example, the wrapper asserts that at
    least ``min_share`` of the examples (and at least two) had both."""

    examples: int = 0
    deciding: int = 0

    def note(self, admitted: int, refused: int) -> None:
        self.examples += 1
        both = admitted > 0 and refused > 0
        self.deciding += both
        event("full buffer: admitted and refused" if both else "full buffer: " + (
            "admitted only" if admitted else "refused only" if refused else "never offered to"
        ))

    def note_records(self, records: list, synced: bool) -> None:
        """``note`` for a run of ``run_stream`` records of a critical rule."""
        admitted = refused = 0
        for rec in records:
            a, r = full_buffer_choices(rec.state_before.critical, rec.state_after.critical, rows_moved(synced, rec.plan.present))
            admitted, refused = admitted + a, refused + r
        self.note(admitted, refused)


ADMISSIONS = AdmissionMix()


def sees_admissions_and_refusals(min_share: float) -> Callable:
    """Wrap a hypothesis test (outside ``@given``) that reports to ``ADMISSIONS``: after its
    examples ran, at least ``min_share`` of them saw a full buffer both admit and refuse."""

    def wrap(test: Callable) -> Callable:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            ADMISSIONS.examples = ADMISSIONS.deciding = 0
            test(*args, **kwargs)
            n, k = ADMISSIONS.examples, ADMISSIONS.deciding
            assert n > 0 and k >= max(2, min_share * n), (
                f"only {k} of {n} examples saw a full buffer both admit and refuse (want >= {min_share:.0%}): "
                "the strategies no longer make the buffer decide"
            )

        return run

    return wrap
