"""Compiled drop-in optimizers: the classes of ``memopt_func.optim`` stepping through ``Stepper``.

``compiled.Adam_CM(model.parameters(), lr=...)`` takes the published signature plus ``flat`` and
``cuda_graph``; ``compile_optimizer(opt)`` turns an existing drop-in (state included) into its
compiled twin. Per param group one ``Stepper`` owns flat parameter, gradient and state buffers;
``opt.state`` holds per-parameter views into them, so ``state_dict()`` and LR schedulers work as
usual, and changing ``lr`` (or any per-step hyperparameter) never recompiles.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from memopt_func import _tree, registry, sharding
from memopt_func import optim as eager
from memopt_func.groups import assemble, explode, row_keys
from memopt_func.optim import MemoryOptimizer

from .stepper import Stepper, flat_refusal


class FlatSteps:
    """Compiled stepping of a drop-in optimizer's param groups: per group one ``Stepper`` over the
    group's parameters that require grad, owning flat parameter, gradient and state buffers, with
    ``opt.state`` holding per-parameter views into them. The compiled drop-ins step through it
    always; an eager drop-in does under ``torch.compile(opt.step)`` (``MemoryOptimizer.step``).
    ``grouped=True``: the same steppers uncompiled (``Stepper(grouped=True)``), the eager
    drop-ins' step on an accelerator (``MemoryOptimizer._steps_grouped``)."""

    def __init__(self, opt: MemoryOptimizer, flat: bool | None = None, cuda_graph: bool | None = None, grouped: bool = False):
        self.opt, self.flat, self.cuda_graph, self.grouped = opt, flat, cuda_graph, grouped
        self.steppers: dict[int, Stepper] = {}
        # per group, the state entries (dicts) that ``adopt`` put in ``opt.state``: a step finding
        # other ones there (``opt.state`` cleared, an entry replaced) adopts them afresh
        self.entries: dict[int, list[tuple[Any, dict, tuple]]] = {}  # (param, entry, its values)

    def stepper(self, index: int, group: dict[str, Any]) -> Stepper:
        """The group's stepper, over its parameters that require grad (a frozen one is never
        stepped and keeps its own state); made afresh, adopting the group's state, when the rule
        or the set of trainable parameters changes."""
        opt = self.opt
        rule = opt.groups.rule(group)
        params = group["params"]
        trainable = [i for i, p in enumerate(params) if p.requires_grad] or list(range(len(params)))
        stepped = [params[i] for i in trainable]
        stepper = self.steppers.get(index)
        same = stepper is not None and len(stepper.leaves) == len(stepped) and all(a is b for a, b in zip(stepper.leaves, stepped))
        if same and stepper.rule is rule and stepper.holds_params() and self._entries_kept(index):
            return stepper
        synced = opt.groups.synced(rule)
        if not opt.state.get(params[0]):  # its layout is now fixed (``_check_layout_kept``)
            opt.groups.record_layout(group, rule)
        dicts = explode(opt.groups.state(group, rule, store=False), len(params), synced)
        chosen = [dict(dicts[i]) for i in trainable]
        template = opt.groups.template(group, rule, stepped)
        if synced:  # the group's key rows live with its first parameter
            chosen[0].update({k: dicts[0][k] for k in row_keys(template) if k in dicts[0]})
        state = assemble(template, chosen, synced)
        stepper = Stepper(rule, stepped, state=state, flat=self.flat, cuda_graph=self.cuda_graph, compile=not self.grouped, grouped=self.grouped)
        self.steppers[index] = stepper
        for p, entry in zip(params, dicts):
            opt.state.setdefault(p, entry)
        self.adopt(index, group, stepper)
        return stepper

    def adopt(self, index: int, group: dict[str, Any], stepper: Stepper) -> None:
        """Point the per-parameter state entries at the stepper's live state."""
        opt = self.opt
        params, synced = group["params"], opt.groups.synced(stepper.rule)
        stepped = stepper.leaves
        entries = explode(stepper.per_tensor_state(), len(stepped), synced)
        for p, entry in zip(stepped, entries):
            opt.state[p] = entry
        if synced and stepped[0] is not params[0]:
            rows = {k: entries[0].pop(k) for k in row_keys(stepper.per_tensor_state()) if k in entries[0]}
            opt.state[params[0]] = {**opt.state[params[0]], **rows}
        self.entries[index] = [(p, e, tuple(e.values())) for p in params for e in (opt.state.get(p, {}),)]

    def _entries_kept(self, index: int) -> bool:
        """Whether ``opt.state`` still holds what ``adopt`` put there for the group: the same
        entry (dict) per parameter, holding the same tensors. A step finding anything else (the
        state cleared, an entry or a tensor in it replaced) adopts ``opt.state`` afresh, as the
        per-tensor step reads it every step."""
        state = self.opt.state
        for p, entry, values in self.entries.get(index, ()):
            if state.get(p) is not entry or len(entry) != len(values) or not all(a is b for a, b in zip(entry.values(), values)):
                return False
        return True

    def check(self, index: int, group: dict[str, Any]) -> bool:
        """Whether the group steps (some parameter has a gradient), raising ValueError for
        anything that would fail its step; changes nothing."""
        opt = self.opt
        name = type(opt).__name__
        params = group["params"]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return False
        try:
            rule = opt.groups.rule(group)
        except ValueError as e:
            raise ValueError(f"{name}, param group {index}: {e}") from None
        for i, p in enumerate(params):
            if p.is_complex():
                raise ValueError(
                    f"{name}, param group {index}: parameter {i} is complex ({p.dtype}); compiled "
                    "stepping takes real tensors (the eager drop-in steps complex parameters)"
                )
        try:
            if opt.state.get(params[0]):
                opt.groups.check_layout_kept(group, rule, list(params))
            stepper = self.steppers.get(index)
            if stepper is None or not stepper.grads_in_place(params):
                _tree.check_grad_leaves(grads, params)
            rule.resolve({name: group[name] for name in rule.dynamic_names()})
        except ValueError as e:
            raise ValueError(f"{name}, param group {index}: {e}") from None
        return True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One compiled step of every param group; a parameter without a gradient is skipped as
        torch.optim skips it. Every group is checked before any group moves."""
        opt = self.opt
        loss = eager.evaluate_closure(closure)
        if opt.defaults.get("differentiable"):
            raise ValueError(f"{type(opt).__name__}: differentiable=True needs the eager drop-in (compiled steps write in place)")
        stepping = [i for i, group in enumerate(opt.param_groups) if self.check(i, group)]
        for index in stepping:
            group = opt.param_groups[index]
            stepper = self.stepper(index, group)
            was_flat = stepper.flat
            stepper.step(None, **{name: group[name] for name in stepper.rule.dynamic_names()})
            if stepper.flat != was_flat:  # it now steps tensor by tensor, over state of its own
                self.adopt(index, group, stepper)
        return loss


class CompiledOptimizer(MemoryOptimizer):
    """Mixin over a ``MemoryOptimizer``: every param group steps through a compiled ``Stepper``."""

    def __init__(self, params: Any, *args: Any, flat: bool | None = None, cuda_graph: bool | None = None, **kwargs: Any):
        self._steps = FlatSteps(self, flat, cuda_graph)
        super().__init__(params, *args, **kwargs)
        if sharding.any_sharded([p for g in self.param_groups for p in g["params"]]):
            raise NotImplementedError(
                f"compiled {type(self).__name__} does not step DTensor (FSDP2-sharded) parameters yet; use the eager "
                f"memopt_func.optim.{type(self).__name__}, which steps the local shards with the full-norm priority"
            )

    @property
    def _steppers(self) -> dict[int, Stepper]:
        return self._steps.steppers

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One compiled step of every param group; a parameter without a gradient is skipped as
        torch.optim skips it. Every group is checked before any group moves."""
        return self._steps.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Flat groups zero their gradient buffer in place (so backward accumulates straight into
        it); other groups follow ``torch.optim.Optimizer.zero_grad``."""
        stepped = set()
        for index, stepper in self._steppers.items():
            if stepper.flat:
                stepper.zero_grad()
                stepped.update(id(p) for p in self.param_groups[index]["params"])
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in stepped or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._steps.steppers = {}  # the next step adopts the loaded state


def _compiled_class(cls: type[MemoryOptimizer]) -> type[CompiledOptimizer]:
    return type(cls.__name__, (CompiledOptimizer, cls), {"__doc__": f"Compiled {cls.__name__}: {cls.__doc__}", "__module__": __name__})


Adam_CM = _compiled_class(eager.Adam_CM)
"""Compiled ``memopt_func.optim.Adam_CM``: its signature plus ``flat`` and ``cuda_graph``."""
Adam_C = _compiled_class(eager.Adam_C)
"""Compiled ``memopt_func.optim.Adam_C``: its signature plus ``flat`` and ``cuda_graph``."""
RMSprop_C = _compiled_class(eager.RMSprop_C)
"""Compiled ``memopt_func.optim.RMSprop_C``: its signature plus ``flat`` and ``cuda_graph``."""
SGD_C = _compiled_class(eager.SGD_C)
"""Compiled ``memopt_func.optim.SGD_C``: its signature plus ``flat`` and ``cuda_graph``."""
AdEMAMix = _compiled_class(eager.AdEMAMix)
"""Compiled ``memopt_func.optim.AdEMAMix``: its signature plus ``flat`` and ``cuda_graph``."""

_BY_EAGER = {eager.Adam_CM: Adam_CM, eager.Adam_C: Adam_C, eager.RMSprop_C: RMSprop_C, eager.SGD_C: SGD_C, eager.AdEMAMix: AdEMAMix}


def __getattr__(name: str) -> type[CompiledOptimizer]:
    """The compiled twin of a registered optimizer without a line above, by its name."""
    if name in registry.NAMED:
        return _twin(eager.optimizer_class(registry.NAMED[name].rule))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _twin(cls: type[MemoryOptimizer]) -> type[CompiledOptimizer]:
    twin = _BY_EAGER.get(cls)
    if twin is None:
        twin = _BY_EAGER[cls] = _compiled_class(cls)
    return twin


def compile_optimizer(opt: MemoryOptimizer, *, flat: bool | None = None, cuda_graph: bool | None = None) -> CompiledOptimizer:
    """The compiled twin of a drop-in optimizer, with its param groups and state."""
    if not isinstance(opt, MemoryOptimizer) or isinstance(opt, CompiledOptimizer):
        raise TypeError(f"compile_optimizer takes a memopt_func drop-in optimizer, got {type(opt).__name__}")
    cls = _twin(type(opt))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]} for g in opt.param_groups]
    twin = cls(groups, flat=flat, cuda_graph=cuda_graph, **{h.name: opt.defaults[h.name] for h in cls.RULE.HYPERS})
    twin.load_state_dict(opt.state_dict())
    return twin


def _rule_gains_flat_group(rule) -> bool:
    """Whether an eager step on an accelerator steps a group of this rule as one flat group: its
    state lays out flat, and it keeps a critical buffer, whose slot writes would otherwise
    launch kernels per tensor, or rounds state stochastically, whose draws would too (any
    other eager step is a fixed number of multi-tensor ops already, which a flat group would
    only add a gradient copy to)."""
    if flat_refusal(rule, grouped=True) is not None or rule.hyper.get("foreach") is False:
        return False  # (foreach=False asks for one op per tensor)
    return bool(getattr(rule, "has_buffer", False)) or rule.storage.draws


eager.use_flat_stepping(FlatSteps, takes=_rule_gains_flat_group)

__all__ = ["CompiledOptimizer", "FlatSteps", "compile_optimizer", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"]
