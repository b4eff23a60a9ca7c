"""The bridge between a ``torch.optim`` optimizer's param groups and a rule's state.

A drop-in optimizer keeps torch.optim's layout: ``opt.state[p]`` is a dict of plain tensors per
parameter. A rule steps a whole group over one state NamedTuple. ``GroupStates`` converts between
the two (``explode`` / ``assemble``, read off the state's ``schema``), and owns what a group's
state depends on: the rule its hyperparameters make, the layout the state was made with (a
change of ``topC``, ``synced``, ``state_dtype``, ... after that raises), and a cached template of
the state's structure. The eager drop-ins, the compiled drop-ins (``memopt_func.compiled``),
``torch.compile(opt.step)`` and ``migrate`` all go through it.

Per-parameter entries: the rule's per-leaf fields under their names (``step``, ``exp_avg``,
``critical_buf``, ...); a nested state's fields take its prefix (``critical_``); the ``ROWS``
fields (the critical buffer's keys and counters) sit with each parameter when ``synced=False``
and, for a synced group, with the group's first parameter only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import _tree, schema
from ._rule import Rule
from .storage import Quantized

ABSMAX = "_absmax"
"""The suffix of an 8-bit entry's block scales in a state_dict (next to its codes under the entry's name)."""


def explode(state: NamedTuple, n: int, synced: bool) -> list[dict[str, Tensor]]:
    """The rule state of a group as one dict per parameter."""
    out: list[dict[str, Tensor]] = [{} for _ in range(n)]
    for key, _, f, value in schema.entries(state):
        if isinstance(value, tuple):
            for d, v in zip(out, value):
                if isinstance(v, Quantized):  # 8-bit codes: two plain tensors in the state_dict
                    d[key], d[key + ABSMAX] = v.codes, v.absmax
                else:
                    d[key] = v
        elif f.role == schema.ROWS and synced:
            out[0][key] = value
        else:
            for d, v in zip(out, value.unbind(0)):
                d[key] = v
    return out


def assemble(template: NamedTuple, dicts: list[dict[str, Tensor]], synced: bool) -> NamedTuple:
    """Inverse of ``explode``: rebuild the rule state shaped like ``template`` from per-parameter dicts."""

    def build(node: Any, prefix: str) -> Any:
        fields = {}
        for field, f in schema.of(node).items():
            value = getattr(node, field)
            key = f"{prefix}{field}"
            if value is None:
                fields[field] = None
            elif f.role == schema.NESTED:
                fields[field] = build(value, prefix + f.prefix)
            elif isinstance(value, tuple):
                if value and key not in dicts[0]:
                    # reached under torch.compile(opt.step), whose traced step cannot compare the
                    # hyperparameters with those the state was made with (``check_layout_kept``)
                    raise ValueError(layout_changed(f"the state has no {key!r}, which these hyperparameters need"))
                fields[field] = tuple(
                    Quantized(d[key], d[key + ABSMAX]) if isinstance(w, Quantized) else d[key] for d, w in zip(dicts, value)
                )
            elif f.role == schema.ROWS and synced:
                fields[field] = dicts[0][key]
            else:
                fields[field] = torch.stack([d[key] for d in dicts])
        return type(node)(**fields)

    return build(template, "")


def row_keys(state: NamedTuple) -> list[str]:
    """The per-parameter keys of a state's ``ROWS`` fields (a synced group's first parameter holds them)."""
    return schema.keys(state, schema.ROWS)


def layout_changed(what: str) -> str:
    """The error message for a state whose layout no longer fits the group's hyperparameters."""
    return (
        f"{what}: a hyperparameter that changes the state's layout (a momentum or beta set to or from 0, "
        "topC, synced, buffer_dtype, amsgrad, state_dtype, ...) changed after the state was made; set it "
        "before the first step, or start a new optimizer (or a new param group) for it"
    )


def real(params: list[Tensor]) -> list[Tensor]:
    """The parameters as the rules see them: a complex tensor as its real view ``[..., 2]`` (as
    torch.optim's Adam, SGD and RMSprop step complex parameters)."""
    return [torch.view_as_real(p) if p.is_complex() else p for p in params]


def layout_value(value: Any) -> Any:
    """A stand-in for a tensor hyperparameter when building a rule: every step passes the real
    value, and reading the tensor here would sync (or break a torch.compile trace). 0.5 is
    non-zero and valid for every per-step hyperparameter."""
    if isinstance(value, (tuple, list)):
        return tuple(layout_value(v) for v in value)
    return 0.5 if isinstance(value, Tensor) else value


def _is_python_zero(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_is_python_zero(v) for v in value)
    # bool(): under torch.compile a float that changes is symbolic, and its comparison must be
    # decided (a guard) before it goes into a key that is compared and hashed
    return not isinstance(value, Tensor) and bool(value == 0)


def _layout(rule: Rule, params: list[Tensor]) -> list:
    """The shapes and dtypes of a fresh state of rule over params (made on the meta device)."""
    state = rule.fresh_state(_tree.meta_like(params))
    return [(tuple(t.shape), t.dtype) for t in pytree.tree_leaves(state)]


class GroupStates:
    """The rule state of each param group of one optimizer (``opt.state`` holds it per parameter).

    ``rule(group)``: the group's rule; ``state(group, rule)``: its state as the rule takes it;
    ``store(group, rule, state)``: a stepped state kept as per-parameter entries;
    ``check_layout_kept`` / ``record_layout``: the layout guard; ``template``: the structure."""

    def __init__(self, opt: torch.optim.Optimizer, rule_cls: type[Rule]) -> None:
        self.opt, self.rule_cls = opt, rule_cls
        self.rules: dict[tuple, Rule] = {}
        self.templates: dict[tuple, NamedTuple] = {}
        # per group (keyed by its first parameter): the rule key, rule and hyperparameter values
        # its state was laid out by
        self.laid_out: dict[Tensor, tuple[tuple, Rule, dict]] = {}
        # per group (by id): the rule and the state entries its last eager step left (``unchanged``)
        self.stepped: dict[int, tuple[Rule, list]] = {}

    @property
    def name(self) -> str:
        """The optimizer's class name (error messages start with it)."""
        return type(self.opt).__name__

    def rule(self, group: dict[str, Any]) -> Rule:
        """The group's rule, cached by what fixes the state layout: the static hyperparameters and
        which per-step ones are exactly zero, where zero is special (e.g. momentum == 0 keeps no
        momentum buffer; ``Hyper.zero_is_special``)."""
        key = self.rule_key(group)
        rule = self.rules.get(key)
        if rule is None:
            hyper = {h.name: layout_value(group[h.name]) for h in self.rule_cls.HYPERS}
            rule = self.rules[key] = self.rule_cls(**hyper)
        return rule

    def rule_key(self, group: dict[str, Any]) -> tuple:
        """What fixes the group's state layout: its static hyperparameters, and which per-step
        ones are exactly zero where zero is special."""
        return tuple(
            (h.name, _is_python_zero(group[h.name])) if h.dynamic else (h.name, group[h.name])
            for h in self.rule_cls.HYPERS
            if h.zero_is_special or not h.dynamic
        )

    @staticmethod
    def synced(rule: Rule) -> bool:
        """Whether the rule keeps one critical-buffer row for the whole group."""
        return bool(rule.hyper.get("synced", False))

    def has_state(self, group: dict[str, Any]) -> bool:
        """Whether the group's parameters have state (their first one holds entries)."""
        return bool(self.opt.state.get(group["params"][0]))

    def check_layout_kept(self, group: dict[str, Any], rule: Rule, params: list[Tensor]) -> None:
        """A group's state keeps the layout it was made with: a structural hyperparameter
        (``topC``, ``synced``, ``buffer_dtype``, ``amsgrad``, a momentum set to or from 0, ...)
        changed after the state exists raises, naming it; other changes apply from this step on.
        ``params``: the group's parameters as the rule steps them (complex ones as real views)."""
        before, old_rule, old_values = self.laid_out.get(group["params"][0], (None, None, None))
        if before is None:
            return
        if torch.compiler.is_compiling():
            return  # checked untraced before any traced step (``MemoryOptimizer._prepare_untraced``)
        key = self.rule_key(group)
        if before == key:
            return
        if _layout(old_rule, params) == _layout(rule, params):
            self.record_layout(group, rule)
            return
        changed = [f"{n!r} from {old_values[n]!r} to {group[n]!r}" for (n, o), (_, v) in zip(before, key) if o != v]
        raise ValueError(
            f"changed {', '.join(changed)} after its state was made, "
            "which changes the state's layout; set it before the first step, or start a new optimizer "
            "(or a new param group) for it"
        )

    def record_layout(self, group: dict[str, Any], rule: Rule) -> None:
        """Note the layout the group's state has now (``check_layout_kept`` compares with it)."""
        self.laid_out[group["params"][0]] = (self.rule_key(group), rule, {h.name: group[h.name] for h in rule.HYPERS})

    def template(self, group: dict[str, Any], rule: Rule, params: list[Tensor], state: NamedTuple | None = None) -> NamedTuple:
        """A state of the structure the group's rule gives params (its values unused): the given
        one, else a cached one, else one made on the meta device (outside any compiled region: after
        a load). Cached by the group's rule key, not by ``id(rule)``: under torch.compile, Dynamo
        fails on the id of a rule cached under a key that holds a dtype (``state_dtype``)."""
        key = (self.rule_key(group), tuple((p.shape, p.dtype, p.device) for p in params))
        if state is not None:
            self.templates[key] = state
        elif key not in self.templates:
            self.templates[key] = rule.fresh_state(_tree.meta_like(params))
        return self.templates[key]

    def state(self, group: dict[str, Any], rule: Rule, params: list[Tensor] | None = None, store: bool = True) -> NamedTuple:
        """The group's state as the rule takes it (over ``params``, default the group's); a group
        without state gets a fresh one, kept in ``opt.state`` only with ``store``."""
        params = group["params"] if params is None else params
        if not self.has_state(group):
            state = rule.init(params)
            if store:
                self.store(group, rule, state)
            return state
        dicts = [self.opt.state[p] for p in group["params"]]
        for i, d in enumerate(dicts):
            if not d:
                raise RuntimeError(
                    f"{self.name}: parameter {i} of a param group has no state while the others do; "
                    "load a complete state_dict or start the group afresh"
                )
        return assemble(self.template(group, rule, params), dicts, self.synced(rule))

    def store(self, group: dict[str, Any], rule: Rule, state: NamedTuple) -> None:
        """Keep a group's new rule state as per-parameter entries of ``opt.state``."""
        params, opt_state = group["params"], self.opt.state
        entries = explode(state, len(params), self.synced(rule))
        if torch.compiler.is_compiling() and opt_state.get(params[0]):
            # written into the tensors the graph was traced with: Dynamo guards on their identity,
            # so new tensors would compile the step again. _foreach_copy_, as
            # torch.compile drops a plain copy_ into a 0-d float64 CPU tensor (``step``)
            pairs = [(opt_state[p][k], v) for p, d in zip(params, entries) for k, v in d.items()]
            pairs = [(dst, src) for dst, src in pairs if dst is not src]
            if pairs:
                torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])
            return
        for p, d in zip(params, entries):
            opt_state[p] = d
        self.template(group, rule, real(params), state)
        self.record_layout(group, rule)

    def entries(self, group: dict[str, Any]) -> list[Any]:
        """The group's parameters' shapes and dtypes, then every entry of their state."""
        params = group["params"]
        return [(p.shape, p.dtype) for p in params] + [v for p in params for v in self.opt.state.get(p, {}).values()]

    def remember(self, group: dict[str, Any], rule: Rule) -> None:
        """Note the state an eager step of the group just left (``unchanged`` compares with it)."""
        self.stepped[id(group)] = (rule, self.entries(group))

    def unchanged(self, group: dict[str, Any], rule: Rule) -> bool:
        """Whether the group's state is, tensor for tensor, what the last eager step of it left
        under the same rule: then its layout needs no new check (the step made it so). Loading a
        state_dict or putting any tensor into ``opt.state`` makes it check again."""
        if torch.compiler.is_compiling():
            return False
        last = self.stepped.get(id(group))
        if last is None or last[0] is not rule:
            return False
        now, then = self.entries(group), last[1]
        n = len(group["params"])
        return len(now) == len(then) and now[:n] == then[:n] and all(a is b for a, b in zip(now[n:], then[n:]))

    def forget(self) -> None:
        """After ``opt.state`` was replaced (a load): no layout recorded, no stepped state held."""
        self.laid_out = {}
        self.stepped = {}


__all__ = ["GroupStates", "explode", "assemble", "row_keys", "real", "layout_value", "layout_changed", "ABSMAX"]
