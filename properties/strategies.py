"""Reusable hypothesis strategies: parameter pytrees, gradient streams, hyperparameters.

Everything drawn here is a small, printable *plan* (shapes, dtypes, seeds, scales, masks,
hyperparameter dicts); tensors are made from a plan deterministically with a seeded
``torch.Generator``. So a failing example prints a plan that rebuilds exactly the same tensors,
and the printed hypothesis seed / ``@reproduce_failure`` blob replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from hypothesis import strategies as st

from memopt_func._critical import CriticalRule
from memopt_func.rules import RULES, critical_class

# SPEC.md section 8.3: ``rules.with_critical_buffer(base, **critical)`` puts a critical buffer
# over any rule. The suite names such a combined rule "<Base>+buffer" and builds it with
# ``harness.make_rule`` from drawn base hyperparameters (``maximize`` included) and drawn
# critical hyperparameters (``critical_hypers``). "RMSprop+buffer" is RMSprop_C reached
# through the combinator; the other two are classes the combinator makes (AdEMAMix_C, AdamW_C).
COMBINED_BASE = {"AdEMAMix+buffer": "AdEMAMix", "AdamW+buffer": "AdamW", "RMSprop+buffer": "RMSprop"}
COMBINED_RULES = tuple(COMBINED_BASE)
# The hyperparameters ``with_critical_buffer`` takes; everything else is the base rule's.
CRITICAL_KEYS = ("topC", "kappa", "decay", "synced", "aggr", "buffer_dtype", "critical_test", "seed")

# Every rule of the package (``memopt_func.registry``: torch.optim's four and every registered
# one), and the registered ones that keep a critical buffer over a base rule.
ALL_RULES = tuple(RULES)
NAMED_CRITICAL_RULES = tuple(n for n, cls in RULES.items() if issubclass(cls, CriticalRule))
# Every rule that keeps a critical buffer: the package's own and the combined ones.
CRITICAL_RULES = NAMED_CRITICAL_RULES + COMBINED_RULES

AGGREGATIONS = ("sum", "mean", "buffer")

FULL_DTYPES = (torch.float64, torch.float32)
LOW_DTYPES = (torch.bfloat16, torch.float16)

# Gradient scale is 10**u with u uniform in these ranges (per dtype family), so consecutive
# steps differ by orders of magnitude and the buffer both admits and refuses.
FULL_LOG10_SCALE = (-4.0, 4.0)
LOW_LOG10_SCALE = (-2.0, 2.0)  # float16 overflows past ~6e4; keep products of steps finite

# Per-leaf scale patterns (``grad_streams(leaf_scales=True)``), drawn afresh each step: all
# leaves alike, one leaf dominating, or each leaf its own scale. A pattern that changes from
# step to step makes a sum of per-tensor norms and the norm of the sum rank steps differently
# (alike: their ratio is sqrt(n); one dominating: about 1).
SCALE_PATTERNS = ("alike", "one dominates", "spread")


def rule_class(name: str) -> type:
    """The rule class of a suite name: ``RULES[name]``, or for a combined name the class
    ``with_critical_buffer`` builds over its base."""
    if name in COMBINED_BASE:
        return critical_class(RULES[COMBINED_BASE[name]])
    return RULES[name]


# --------------------------------------------------------------------------- pytrees


class _Leaf:
    """Placeholder for leaf number ``index`` inside a pytree skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"L{self.index}"


def _fill(skeleton: Any, leaves: list) -> Any:
    if isinstance(skeleton, _Leaf):
        return leaves[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: _fill(v, leaves) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(v, leaves) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(_fill(v, leaves) for v in skeleton)
    raise TypeError(skeleton)


@dataclass(frozen=True)
class TreePlan:
    """A parameter pytree: nesting skeleton, per-leaf shape and dtype, and a value seed."""

    skeleton: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    seed: int

    @property
    def n(self) -> int:
        return len(self.shapes)

    def build(self) -> Any:
        """The parameter pytree (fresh tensors each call)."""
        gen = torch.Generator().manual_seed(self.seed)
        leaves = [torch.randn(s, dtype=torch.float64, generator=gen).to(d) for s, d in zip(self.shapes, self.dtypes)]
        return _fill(self.skeleton, leaves)

    @property
    def low_precision(self) -> bool:
        return any(d in LOW_DTYPES for d in self.dtypes)


def shapes() -> st.SearchStrategy[tuple[int, ...]]:
    """0-d to 3-d shapes with small dims; an empty (size-0) dim now and then."""
    dim = st.sampled_from([1, 2, 3, 4, 1, 2, 3, 5, 0])
    return st.lists(dim, min_size=0, max_size=3).map(tuple)


@st.composite
def skeletons(draw, n: int, depth: int = 0) -> Any:
    """A nested dict/list/tuple structure holding n leaf placeholders (filled left to right)."""

    def build(n: int, depth: int, counter: list[int]) -> Any:
        if n == 1 and (depth >= 3 or draw(st.booleans())):
            counter[0] += 1
            return _Leaf(counter[0] - 1)
        kind = draw(st.sampled_from(["dict", "list", "tuple"]))
        # a one-child container only near the top, so the nesting always terminates
        k = draw(st.integers(1 if (n == 1 or depth < 2) else 2, min(n, 3)))
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1, unique=True))) if n > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
        children = [build(s, depth + 1, counter) for s in sizes]
        if kind == "dict":
            # deliberately not alphabetical: the rule must follow pytree order, whatever it is
            names = draw(st.permutations(["w", "b", "emb", "z"]))[: len(children)]
            return dict(zip(names, children))
        return children if kind == "list" else tuple(children)

    return build(n, depth, [0])


@st.composite
def run_of_shapes(draw, *, min_count: int = 2, max_count: int = 4) -> list[tuple[int, ...]]:
    """2-4 shapes of one size, as bias-free layers or stacked heads give: often the same shape,
    sometimes the same number of elements in other shapes (``(4, 6)``, ``(6, 4)``, ``(24,)``),
    which a flat layout also lays out as one run."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    count = draw(st.integers(min_count, max_count))
    if draw(st.integers(0, 2)) != 0:
        return [(rows, cols)] * count
    return [draw(st.sampled_from([(rows, cols), (cols, rows), (rows * cols,), (1, rows * cols)])) for _ in range(count)]


@st.composite
def shape_lists(draw, *, min_leaves: int = 1, max_leaves: int = 4, runs: bool = False) -> list[tuple[int, ...]]:
    """Leaf shapes; with ``runs``, blocks that are runs of equal-sized tensors (``run_of_shapes``)
    among single shapes of any size (mixed models: weights and biases)."""
    if not runs:
        return [draw(shapes()) for _ in range(draw(st.integers(min_leaves, max_leaves)))]
    out: list[tuple[int, ...]] = []
    while len(out) < min_leaves or (len(out) < max_leaves and draw(st.integers(0, 2)) != 0):
        room = max_leaves - len(out)
        if room >= 2 and draw(st.booleans()):
            out += draw(run_of_shapes(max_count=min(4, room)))
        else:
            out.append(draw(shapes()))
    return out


@st.composite
def trees(
    draw, *, min_leaves: int = 1, max_leaves: int = 4, low_precision: bool = True, mixed: bool = True, runs: bool = False
) -> TreePlan:
    """Parameter pytrees of varied shapes (0-d included) and nesting; float64/float32 and,
    with ``low_precision``, bfloat16/float16 leaves; ``mixed`` allows several dtypes in one tree.
    ``runs``: the leaves include runs of equal-sized tensors (see ``shape_lists``)."""
    leaf_shapes = draw(shape_lists(min_leaves=min_leaves, max_leaves=max_leaves, runs=runs))
    n = len(leaf_shapes)
    pool = FULL_DTYPES + (LOW_DTYPES if low_precision else ())
    if mixed and draw(st.booleans()):
        dtypes = tuple(draw(st.sampled_from(pool)) for _ in range(n))
    else:
        dtypes = (draw(st.sampled_from(pool)),) * n
    return TreePlan(
        skeleton=draw(skeletons(n)),
        shapes=tuple(leaf_shapes),
        dtypes=dtypes,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def flat(tree: Any) -> tuple[list, Any]:
    """Leaves (None counts as a leaf) and spec of a params/grads pytree, in the rules' order."""
    return pytree.tree_flatten(tree, is_leaf=lambda x: x is None)


# --------------------------------------------------------------------------- gradient streams


@dataclass
class StepPlan:
    """One step of a gradient stream: values from ``seed`` times ``scale`` (times
    ``leaf_scales[i]`` for leaf i, when given); ``present[i]`` False gives leaf i a None
    gradient; ``per_step`` are hyperparameter overrides for ``rule.step`` (``tensor_keys`` of
    them are passed as 0-d float64 tensors)."""

    seed: int
    scale: float
    present: tuple[bool, ...]
    per_step: dict[str, float] = field(default_factory=dict)
    tensor_keys: tuple[str, ...] = ()
    leaf_scales: tuple[float, ...] | None = None

    def grads(self, leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per-leaf gradients (None where absent); the values do not depend on the mask."""
        gen = torch.Generator().manual_seed(self.seed)
        factors = self.leaf_scales or (1.0,) * len(leaves)
        out = []
        for p, here, factor in zip(leaves, self.present, factors):
            g = (torch.randn(p.shape, dtype=torch.float64, generator=gen) * (self.scale * factor)).to(p.dtype)
            out.append(g if here else None)
        return out

    def kwargs(self) -> dict[str, Any]:
        return {
            k: torch.tensor(v, dtype=torch.float64) if k in self.tensor_keys else v for k, v in self.per_step.items()
        }

    @property
    def any_present(self) -> bool:
        return any(self.present)


@st.composite
def leaf_scale_patterns(draw, n_leaves: int, *, low_precision: bool = False) -> tuple[float, ...]:
    """One step's per-leaf scale factors, following one of ``SCALE_PATTERNS``."""
    width = 0.5 if low_precision else 1.5  # decades either side of 1
    kind = draw(st.sampled_from(SCALE_PATTERNS))
    if kind == "alike" or n_leaves == 1:
        return (1.0,) * n_leaves
    if kind == "one dominates":
        top = draw(st.integers(0, n_leaves - 1))
        return tuple(1.0 if i == top else 10.0 ** -width for i in range(n_leaves))
    return tuple(10.0 ** draw(st.floats(-width, width)) for _ in range(n_leaves))


@st.composite
def grad_streams(
    draw,
    n_leaves: int,
    *,
    min_steps: int = 1,
    max_steps: int = 12,
    low_precision: bool = False,
    allow_none: bool = True,
    per_step: st.SearchStrategy[dict] | None = None,
    tensor_per_step: bool = False,
    walk: bool = False,
    leaf_scales: bool = False,
) -> list[StepPlan]:
    """A stream of steps whose gradient scale is log-uniform over many decades (so the critical
    buffer both admits and refuses), with repeats of the previous step (equal priorities: ties),
    an all-zero step now and then, and, with ``allow_none``, occasional None leaves.

    ``walk``: the scale instead walks (in decades) from a random start, trending up, then turning
    down (or the reverse) between 40% and 80% of the stream, with jitter: a slowly decaying key
    then meets priorities just above and just below it, so a full buffer keeps choosing.
    ``leaf_scales``: each step also scales the leaves by a fresh ``leaf_scale_patterns`` draw."""
    lo, hi = LOW_LOG10_SCALE if low_precision else FULL_LOG10_SCALE
    n_steps = draw(st.integers(min_steps, max_steps))
    none_rate = draw(st.sampled_from([0, 4, 2])) if allow_none else 0
    if walk:
        level = draw(st.floats(lo, hi))
        trend = draw(st.sampled_from([-0.3, 0.3]))
        turn = draw(st.integers(2 * n_steps // 5, 4 * n_steps // 5))
    steps: list[StepPlan] = []
    for k in range(n_steps):
        kind = draw(st.integers(0, 9))
        factors = draw(leaf_scale_patterns(n_leaves, low_precision=low_precision)) if leaf_scales else None
        if kind == 9 and steps:
            # same gradient again: a priority tie
            seed, scale, factors = steps[-1].seed, steps[-1].scale, steps[-1].leaf_scales
        else:
            seed = draw(st.integers(0, 2**31 - 1))
            if walk:
                level = min(hi, max(lo, level + (trend if k < turn else -trend) + draw(st.floats(-0.8, 0.8))))
                scale = 0.0 if kind == 8 else 10.0**level
            else:
                scale = 0.0 if kind == 8 else 10.0 ** draw(st.floats(lo, hi))
        if none_rate:
            present = tuple(draw(st.integers(0, none_rate)) != 0 for _ in range(n_leaves))
        else:
            present = (True,) * n_leaves
        overrides = draw(per_step) if per_step is not None else {}
        tkeys = tuple(k for k in overrides if tensor_per_step and draw(st.booleans()))
        steps.append(StepPlan(seed, scale, present, overrides, tkeys, factors))
    return steps


# --------------------------------------------------------------------------- hyperparameters


def _unit(*, zero: bool = True, one_minus: float = 0.999) -> st.SearchStrategy[float]:
    """A beta-like value in [0, 1): 0 as an edge value, else floats."""
    inner = st.floats(0.0, one_minus)
    return st.one_of(st.just(0.0), inner) if zero else inner


lrs = st.one_of(st.just(0.0), st.sampled_from([1e-3, 1e-2, 0.1]), st.floats(1e-5, 0.5))
epss = st.sampled_from([1e-8, 1e-6, 1e-3, 0.1])
weight_decays = st.one_of(st.just(0.0), st.floats(1e-4, 0.2))
decays = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
# Decays at which a key outlives several steps, so a full buffer has to choose between the
# values it holds and the new one (at 0.7 a key falls below almost any new priority within a
# few steps, and nearly every offer is admitted).
deciding_decays = st.one_of(st.sampled_from([0.9, 0.99, 0.999]), st.floats(0.9, 0.999))
kappas_positive = st.one_of(st.just(1.0), st.floats(0.01, 4.0))
critical_tests = st.one_of(st.just(0.0), st.just(0.0), st.just(1.0), st.floats(0.05, 0.95))
warmups = st.one_of(st.none(), st.integers(1, 8))


@st.composite
def adam_hypers(draw) -> dict:
    return {
        "lr": draw(lrs),
        "betas": (draw(_unit(one_minus=0.99)), draw(_unit(one_minus=0.9999))),
        "eps": draw(epss),
        "weight_decay": draw(weight_decays),
        "amsgrad": draw(st.booleans()),
    }


@st.composite
def sgd_hypers(draw, *, nesterov: bool = False) -> dict:
    h = {
        "lr": draw(lrs),
        "momentum": draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99))),
        "dampening": draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9))),
        "weight_decay": draw(weight_decays),
    }
    if nesterov and h["momentum"] > 0 and h["dampening"] == 0:
        h["nesterov"] = draw(st.booleans())
    return h


@st.composite
def rmsprop_hypers(draw) -> dict:
    # centered with alpha == 0 computes sqrt(g*g - g*g): rounding decides between 0 and NaN
    alpha = draw(st.one_of(st.just(0.0), st.floats(0.5, 0.999)))
    return {
        "lr": draw(st.one_of(st.just(0.0), st.floats(1e-5, 0.05))),
        "alpha": alpha,
        "eps": draw(epss),
        "weight_decay": draw(weight_decays),
        "momentum": draw(st.one_of(st.just(0.0), st.floats(0.01, 0.9))),
        "centered": draw(st.booleans()) if alpha > 0 else False,
    }


@st.composite
def ademamix_hypers(draw, *, alpha_zero: bool | None = None) -> dict:
    """AdEMAMix hyperparameters; ``alpha_zero=True`` gives the AdamW reduction (alpha 0, no alpha warmup)."""
    if alpha_zero is None:
        alpha_zero = draw(st.booleans())
    return {
        "lr": draw(lrs),
        "betas": (draw(_unit(one_minus=0.99)), draw(_unit(one_minus=0.9999)), draw(st.floats(0.9, 0.9999))),
        "alpha": 0.0 if alpha_zero else draw(st.one_of(st.just(2.0), st.floats(0.01, 8.0))),
        "beta3_warmup": draw(warmups),
        "alpha_warmup": None if alpha_zero else draw(warmups),
        "eps": draw(epss),
        "weight_decay": draw(weight_decays),
    }


BASE_OF = {name: RULES[name].BASE.__name__ for name in NAMED_CRITICAL_RULES}


def critical_base_hypers(name: str) -> st.SearchStrategy[dict]:
    """The base hyperparameters of a registered critical rule ``name`` (by its ``BASE`` rule);
    a base without a strategy here fails, naming it, so no rule leaves the suite unnoticed."""
    base = RULES[name].BASE.__name__
    strategies = {"SGD": sgd_hypers, "Adam": adam_hypers, "AdamW": adam_hypers, "RMSprop": rmsprop_hypers, "AdEMAMix": ademamix_hypers}
    if base not in strategies:
        raise KeyError(f"{name}: no hyperparameter strategy for its base rule {base}; add one to properties/strategies.py")
    return strategies[base]()


@st.composite
def critical_hypers(draw, *, buffer: bool | None = None, low_precision: bool = False, deciding: bool = False) -> dict:
    """The critical-buffer hyperparameters. ``buffer=True``: kappa > 0 and topC >= 1 (a buffer
    exists); ``False``: kappa == 0 or topC == 0 (the degenerate, base-rule case); None: either.
    ``deciding``: mostly ``deciding_decays`` and critical_test 0, so a full buffer both admits
    and refuses (the edge values stay in the mix)."""
    if buffer is None:
        buffer = draw(st.integers(0, 4)) != 0
    if buffer:
        top_c, kappa = draw(st.integers(1, 6)), draw(kappas_positive)
    else:
        which = draw(st.sampled_from(["kappa", "topC", "both"]))
        top_c = 0 if which != "kappa" else draw(st.integers(1, 6))
        kappa = 0.0 if which != "topC" else draw(kappas_positive)
    dtypes = [None, torch.float64, torch.float32] + ([torch.bfloat16, torch.float16] if low_precision else [torch.bfloat16])
    if deciding:
        decay = draw(decays) if draw(st.integers(0, 5)) == 0 else draw(deciding_decays)
        critical_test = draw(critical_tests) if draw(st.integers(0, 3)) == 0 else 0.0
    else:
        decay, critical_test = draw(decays), draw(critical_tests)
    return {
        "topC": top_c,
        "kappa": kappa,
        "decay": decay,
        "synced": draw(st.booleans()),
        "aggr": draw(st.sampled_from(AGGREGATIONS)),
        "buffer_dtype": draw(st.sampled_from(dtypes)),
        "critical_test": critical_test,
        "seed": draw(st.integers(-(2**40), 2**40)),
    }


def base_hypers(name: str, **kw) -> st.SearchStrategy[dict]:
    """Hyperparameters of a non-critical rule."""
    return {
        "Adam": adam_hypers(),
        "AdamW": adam_hypers(),
        "SGD": sgd_hypers(nesterov=True),
        "RMSprop": rmsprop_hypers(),
        "AdEMAMix": ademamix_hypers(**kw),
    }[name]


@st.composite
def rule_hypers(draw, name: str, *, buffer: bool | None = None, low_precision: bool = False, deciding: bool = False) -> dict:
    """Full constructor kwargs for rule ``name`` (critical rules: base + buffer hyperparameters;
    ``deciding``: see ``critical_hypers``)."""
    if name in RULES and issubclass(RULES[name], CriticalRule):
        crit = critical_hypers(buffer=buffer, low_precision=low_precision, deciding=deciding)
        return {**draw(critical_base_hypers(name)), **draw(crit)}
    if name in COMBINED_BASE:
        # the base rule's own hyperparameters, maximize too: a combined rule offers the
        # maximize-adjusted gradient (SPEC 2.6, 8.3)
        base = {**draw(base_hypers(COMBINED_BASE[name])), "maximize": draw(st.booleans())}
        crit = critical_hypers(buffer=buffer, low_precision=low_precision, deciding=deciding)
        return {**base, **draw(crit)}
    if name not in ("Adam", "AdamW", "SGD", "RMSprop", "AdEMAMix"):
        raise KeyError(f"{name}: no hyperparameter strategy; add one to properties/strategies.py (base_hypers)")
    return draw(base_hypers(name))


_PER_STEP_VALUES = {
    "lr": lrs,
    "weight_decay": weight_decays,
    "eps": epss,
    "alpha": st.floats(0.5, 0.999),
    "dampening": st.floats(0.0, 0.9),
    "decay": decays,
}


@st.composite
def per_step_overrides(draw, name: str) -> dict:
    """Per-step hyperparameter overrides ``name`` accepts (``rule.step(..., **overrides)``): a
    random subset of lr, weight_decay, eps, alpha, dampening and (critical rules) decay. Betas and
    momentum stay fixed: switching them between zero and non-zero changes the state layout."""
    names = [n for n in rule_class(name).dynamic_names() if n in _PER_STEP_VALUES]
    if draw(st.integers(0, 2)) == 0:
        return {}
    return {n: draw(_PER_STEP_VALUES[n]) for n in names if draw(st.integers(0, 2)) == 0}


def decay_overrides(*, deciding: bool = False) -> st.SearchStrategy[dict]:
    """Mostly no override (the rule's own decay), sometimes a per-step decay (``deciding``:
    mostly one of ``deciding_decays``)."""
    if deciding:
        per_step = st.one_of(decays, deciding_decays, deciding_decays)
        return st.one_of(st.just({}), st.just({}), st.just({}), st.builds(lambda d: {"decay": d}, per_step))
    return st.one_of(st.just({}), st.just({}), st.builds(lambda d: {"decay": d}, decays))

