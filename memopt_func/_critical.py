"""The shared shape of the memory-augmented rules: a base rule plus a critical buffer."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from . import _hyper as H
from . import _math as M
from . import critical_buffer as cb
from . import schema
from ._parts import in_parts
from ._rule import Rule
from .storage import check_buffer_dtype


@schema.declare(base=schema.nested(), critical=schema.nested("critical_"))
class CriticalState(NamedTuple):
    """The state of a critical variant: the base rule's state and the critical buffer's."""

    base: NamedTuple  # the base rule's state
    critical: cb.CriticalBufferState | None  # None when kappa == 0 or topC == 0

    @property
    def step(self) -> Tensor:
        return self.base.step


def critical_hypers(top_c: int, aggr: str) -> tuple[H.Hyper, ...]:
    return (
        H.Hyper("kappa", 1.0, H.nonnegative),
        H.Hyper("topC", top_c, H.count),
        H.Hyper("decay", 0.7, H.unit_closed, dynamic=True),
        H.Hyper("critical_test", 0.0, H.unit_closed),
        H.Hyper("synced", True, H.flag),
        H.Hyper("buffer_dtype", None, check_buffer_dtype),
        H.Hyper("aggr", aggr, H.choice(*cb.AGGREGATIONS)),
    )  # the seed of critical_test's draws is the base rule's ``seed`` (``_hyper.storage``)


class CriticalRule(Rule):
    """A base rule whose gradient is replaced by its critical-buffer aggregate.

    Per step: ``nu`` from the raw gradients and the admission decided; then per leaf
    ``x = buffer_input(g)``, ``a = aggregate(x)``, ``x`` written to its slot, base step on ``a``;
    then the keys and counters, and key decay. With ``kappa == 0`` or ``topC == 0`` there is
    no buffer and the rule is its base rule exactly.
    """

    BASE: type[Rule]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = cls.__dict__.get("BASE")
        if base is not None and "ELEMENTWISE" not in cls.__dict__:
            cls.ELEMENTWISE = base.ELEMENTWISE  # the buffer's own work is element-wise

    def __init__(self, **hyper: Any) -> None:
        super().__init__(**hyper)
        base_names = {h.name for h in self.BASE.HYPERS}
        self.base = self.BASE(**{k: v for k, v in self.hyper.items() if k in base_names})

    @property
    def has_buffer(self) -> bool:
        return self.hyper["kappa"] != 0 and self.hyper["topC"] > 0

    def _base_hyper(self, h: dict[str, Any]) -> dict[str, Any]:
        return {k: h.get(k, v) for k, v in self.base.hyper.items()}

    def _check_per_step(self, h):
        self.base._check_per_step(self._base_hyper(h))

    def _init(self, leaves):
        critical = None
        if self.has_buffer:
            critical = cb.init(leaves, self.hyper["topC"], self.hyper["synced"], self.hyper["buffer_dtype"])
        return CriticalState(base=self.base._init(leaves), critical=critical)

    def _buffer_input(self, params, grads, h):
        """The value the buffer aggregates and stores (the raw gradient unless overridden)."""
        return grads

    def _base_hyper_after_buffer(self, hb):
        return hb

    def _update_all(self, params, grads, state, idx, h, ctx):
        """nu and the admission over all present leaves, then ``_update_part`` over each of
        ``ctx.parts`` (the element-wise work), then the keys and counters once, then key decay."""
        hb = self._base_hyper(h)
        if state.critical is None:

            def base_update(params, grads, base, idx, h, ctx):
                return self.base._update(params, grads, base, idx, hb, ctx)

            new_params, base = in_parts(base_update, params, grads, state.base, idx, h, ctx)
            return new_params, CriticalState(base, None)
        crit = state.critical
        norms = cb.tensor_norms(crit, grads, ctx.segments)
        if ctx.norms is not None:
            norms = ctx.norms.full_norms(norms)
        finite = M.finite(norms)
        decision = cb.decide(crit, idx, cb.priority_of(crit, norms, finite), h["critical_test"], h.get("seed", 0), finite, ctx.segments)

        def part_update(params, grads, both, idx, h, ctx):
            new_params, base, crit = self._update_part(params, grads, both.base, both.critical, idx, decision, h, ctx)
            return new_params, CriticalState(base, crit)

        new_params, state = in_parts(part_update, params, grads, state, idx, h, ctx)
        crit = cb.commit(state.critical, decision)
        return new_params, CriticalState(state.base, cb.decay(crit, idx, h["decay"]))

    def _update_part(self, params, grads, base, crit, idx, decision, h, ctx):
        """The element-wise step of leaves idx given the offer's decision: (params, base, crit)."""
        hb = self._base_hyper(h)
        x = self._buffer_input(params, grads, hb)
        a = cb.aggregate(crit, x, idx, h["kappa"], h["aggr"])
        crit = cb.write(crit, x, idx, decision, ctx.donate)
        new_params, base = self.base._update(params, a, base, idx, self._base_hyper_after_buffer(hb), ctx)
        return new_params, base, crit


_CRITICAL_OF: dict[type[Rule], type[CriticalRule]] = {}


def critical_class(base: type[Rule]) -> type[CriticalRule]:
    """The critical-gradient rule over a base rule class: the named one where the package has it
    (Adam -> Adam_C, RMSprop -> RMSprop_C, SGD -> SGD_C), else ``<Base>_C`` (topC 10, ``aggr="sum"``,
    the raw gradient offered, as Adam_C does)."""
    if issubclass(base, CriticalRule) or base.__name__ in ("Adam_CM",):
        raise ValueError(f"{base.__name__} already keeps a critical buffer; give with_critical_buffer its base rule")
    cls = _CRITICAL_OF.get(base)
    if cls is None:
        cls = _CRITICAL_OF[base] = type(
            f"{base.__name__}_C",
            (CriticalRule,),
            {
                "BASE": base,
                "HYPERS": base.HYPERS + critical_hypers(top_c=10, aggr="sum"),
                "__doc__": f"{base.__name__} on the critical-gradient aggregate (``rules.with_critical_buffer``).",
                "__module__": __name__,
            },
        )
    return cls


def register_critical(base: type[Rule], cls: type[CriticalRule]) -> None:
    """Name the package's own critical rule over a base (``critical_class`` then returns it)."""
    _CRITICAL_OF[base] = cls


def with_critical_buffer(rule: Rule, **critical: Any) -> CriticalRule:
    """``rule`` with its gradient input replaced by the critical-buffer aggregate (SPEC.md, "The
    critical buffer"): per step the raw gradient's priority decides admission, the rule steps on
    ``aggregate(g)`` and ``g`` is offered. ``critical`` takes ``topC``, ``decay``, ``kappa``,
    ``aggr``, ``synced``, ``buffer_dtype``, ``critical_test`` and ``seed`` (defaults: the named
    rule's where the package has one, else topC 10 and ``aggr="sum"``). Over Adam, RMSprop and
    SGD this is exactly Adam_C, RMSprop_C and SGD_C; at ``kappa == 0`` it is the rule itself."""
    cls = critical_class(type(rule))
    names = {h.name for h in cls.HYPERS}
    crit_names = {h.name for h in critical_hypers(0, "sum")} | {"seed"}
    unknown = sorted(set(critical) - crit_names)
    if unknown:
        raise TypeError(f"with_critical_buffer got unknown argument(s) {unknown}; it takes {sorted(crit_names)}")
    dropped = {k: v for k, v in rule.hyper.items() if k not in names}
    for k, v in dropped.items():
        default = next(h.default for h in type(rule).HYPERS if h.name == k)
        if v != default:
            raise ValueError(f"{cls.__name__} has no {k!r}: cannot carry {type(rule).__name__}'s {k}={v!r}")
    return cls(**{**{k: v for k, v in rule.hyper.items() if k in names}, **critical})
