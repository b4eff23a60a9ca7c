"""Drop-in ``torch.optim.Optimizer`` classes with the published constructor signatures.

Each is a thin adapter over a functional rule of this package: per param group it gathers the
parameters, gradients and per-parameter state into the rule's pure ``step``, then writes the new
parameters in place and rebinds the new state. No formula lives here.

State layout (what ``state_dict()`` holds, plain tensors only): see ``memopt_func.groups``, the
bridge between param groups and rule state that every drop-in goes through.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _tree, checkpoint, registry, sharding
from ._rule import Rule
from ._scratch import Scratch
from .groups import GroupStates, assemble, explode, layout_value, real  # noqa: F401  (assemble, explode: optim's names)

# The eval-frame callback that an enclosing torch.compile installs (None outside one), read from a
# frame that Dynamo does not trace (``MemoryOptimizer.step``), where ``is_compiling()`` is False.
_compile_callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
_compile_callback = getattr(_compile_callback, "get_eval_frame_callback", lambda: None)

# What a step under torch.compile hands over to: the speed package's flat stepping, which depends on
# this module and registers itself here when it is imported (``import memopt_func`` imports it).
_FLAT_STEPPING: dict[str, Any] = {"factory": None, "takes": None}


def use_flat_stepping(factory: Callable[..., Any], takes: Callable[[Rule], bool] | None = None) -> None:
    """Register the flat stepping that ``MemoryOptimizer.step`` hands over to:
    ``factory(opt).step(closure)`` under ``torch.compile``, and ``factory(opt, grouped=True)``
    for an eager step on an accelerator where ``takes(rule)`` holds for every group's rule
    (``group_steps``); ``memopt_func.compiled`` registers its ``FlatSteps``."""
    _FLAT_STEPPING["factory"] = factory
    _FLAT_STEPPING["takes"] = takes


def _params_fit_flat_group(params: list[Tensor]) -> bool:
    """Whether a param group's parameters can step as one flat group with the numbers of the
    per-tensor step: on one accelerator in one dtype (one flat buffer, whose tensors' norms sum
    in the parameters' order), none empty (its norm, 0, takes a place in that sum), none frozen
    with a gradient (the per-tensor step steps it; a flat group leaves frozen tensors out), and
    none an FSDP1 flat parameter (FSDP re-points its storage at every reshard)."""
    first = params[0]
    if not group_steps(first.device):
        return False
    for p in params:
        if p.device != first.device or p.dtype != first.dtype or p.numel() == 0 or getattr(p, "_is_flat_param", False):
            return False
        if not p.requires_grad and p.grad is not None:
            return False
    return True


def group_steps(device: torch.device) -> bool:
    """Whether an eager step over parameters on ``device`` runs each param group as one flat
    group (``MemoryOptimizer._steps_grouped``): on an accelerator, where every kernel launch
    costs host time whatever its size, so a step launches a fixed number of kernels per group
    instead of some per tensor. Not on a CPU, whose eager step reads the critical slots on the
    host and works through the tensors in cache-sized runs."""
    return device.type != "cpu"


_HANDOVER = (
    "a memopt_func drop-in's step runs its compiled flat steppers outside the traced frame, as one graph break "
    "(fullgraph=True forbids it, as for torch.optim's steps); for a step traced into your graph, use the "
    "functional rule's step, or memopt_func.compiled's Stepper for a compiled step of its own"
)

class MemoryOptimizer(torch.optim.Optimizer):
    """Base of the drop-in optimizers: a functional rule stepped over each param group."""

    RULE: type[Rule]
    #: On a CPU, step the element-wise work over runs of parameters of about this many elements
    #: at a time, so that each run's state stays in cache across the step's passes (None: all at once).
    cpu_chunk_numel: int | None = 1 << 20
    # The published constructor's positional order; the rule's other hyperparameters follow.
    POSITIONAL: tuple[str, ...] = ()

    @classmethod
    def _argument_order(cls) -> list[str]:
        rest = [h.name for h in cls.RULE.HYPERS if h.name not in cls.POSITIONAL]
        return list(cls.POSITIONAL) + rest

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        named = registry.NAMED.get(cls.__name__) if cls.__module__ == __name__ else None
        if named is not None and not hasattr(cls, "RULE"):
            cls.RULE, cls.POSITIONAL = named.rule, named.positional  # a registered optimizer's drop-in
        if not hasattr(cls, "RULE"):
            return  # an abstract mixin such as compiled.CompiledOptimizer
        defaults = {h.name: h.default for h in cls.RULE.HYPERS}
        params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[name])
            for name in cls._argument_order()
        ]
        params.append(inspect.Parameter("differentiable", inspect.Parameter.KEYWORD_ONLY, default=False))
        cls.__signature__ = inspect.Signature(params)

    def __init__(self, params: Iterable, *args: Any, differentiable: bool = False, **kwargs: Any) -> None:
        if not isinstance(differentiable, bool):
            raise ValueError(f"invalid differentiable: {differentiable!r} (differentiable must be True or False)")
        names = self._argument_order()
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} hyperparameters after params")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__} got multiple values for argument {name!r}")
            kwargs[name] = value
        defaults = self.RULE(**kwargs).hyper  # validates; ValueError before anything exists
        #: The bridge between the param groups and the rule's state (``memopt_func.groups``).
        self.groups = GroupStates(self, self.RULE)
        self._stats_offset: dict[int, dict[str, int]] = {}
        super().__init__(params, {**defaults, "differentiable": differentiable})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim; the rule's own hyperparameters are validated before the group is added,
        and any other key (``lr_scale``, ``name``, ...) is kept untouched, as torch.optim keeps it."""
        if isinstance(param_group, dict):
            hyper = {h.name: param_group.get(h.name, self.defaults[h.name]) for h in self.RULE.HYPERS}
            self.RULE(**hyper)
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        fits = not any(p.is_complex() for p in params) and not sharding.any_sharded(params)
        self.__dict__["_flat_fits"] = self.__dict__.get("_flat_fits", True) and fits

    @torch.compiler.disable(recursive=False, reason=_HANDOVER)
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every param group; parameters without ``.grad`` are skipped.

        Every group's inputs are checked before any group is updated, so an error leaves every
        parameter and all state as they were. With ``differentiable=True`` the step is recorded by
        autograd (out of place, then copied into the parameters), as in torch.optim.

        Under ``torch.compile`` (``torch.compile(opt.step)``, PyTorch's recipe, or a compiled
        training step that calls it) the step runs through compiled flat steppers, as the
        compiled drop-ins do (``_steps_flat``). Dynamo does not trace this frame (it traces the
        functions it calls), so that choice costs the recipe's frame one graph break."""
        if self._steps_flat():
            return self._flat_step(closure)
        if _compile_callback() is not None:
            # made and checked here, untraced: state made inside the traced step differs between
            # Dynamo's first analysis and a restarted one, and a check there would break its graph
            self._prepare_untraced()
        elif self._steps_grouped():
            return self._grouped_step(closure)
        return self._step(closure)

    def _steps_grouped(self) -> bool:
        """Whether this eager step runs each param group as one flat group, through uncompiled
        flat steppers (``FlatSteps(opt, grouped=True)``): not ``differentiable``; in every group
        the parameters on one accelerator in one dtype (``group_steps``), none of them complex,
        DTensor, FSDP1 flat or empty, none frozen with a gradient; and every group's rule one
        that a flat group helps (``use_flat_stepping``'s ``takes``: a synced critical buffer or
        stochastically rounded state, not 8-bit state, not ``foreach=False``). As under
        ``torch.compile``, the parameters then become views into one flat buffer per group, and
        the state entries views into the flat state. Where a step does not qualify (a group
        added that does not), every group goes back to the rule's own per-tensor step over the
        same state entries."""
        takes = _FLAT_STEPPING["takes"]
        fits = (
            takes is not None
            and self.__dict__.get("_flat_fits", False)
            and not self.defaults.get("differentiable", False)
            and all(_params_fit_flat_group(group["params"]) for group in self.param_groups)
        )
        if fits:
            try:
                fits = all(takes(self.groups.rule(group)) for group in self.param_groups)
            except ValueError:  # a bad hyperparameter: the per-tensor step raises it, naming the group
                fits = False
        if not fits:
            self.__dict__.pop("_group_steps", None)
        return fits

    @torch.no_grad()
    def _grouped_step(self, closure: Callable[[], Any] | None) -> Any:
        """The eager step through uncompiled ``FlatSteps`` (see ``_steps_grouped``)."""
        steps = self.__dict__.get("_group_steps")
        if steps is None:
            steps = self.__dict__["_group_steps"] = _FLAT_STEPPING["factory"](self, grouped=True)
        return steps.step(closure)

    @torch.compiler.disable
    def _prepare_untraced(self) -> None:
        """A fresh state for every group that steps and has none, then ``_check_layout_kept``
        for every group that steps (ValueError naming the group). Disabled for Dynamo, which
        would otherwise trace this frame too: ``step``'s own frame is the only one it skips."""
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if all(p.grad is None for p in params):
                continue
            if not self.state.get(params[0]):
                self._init_group(group)
                continue
            try:
                self.groups.check_layout_kept(group, self.groups.rule(group), real(params))
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}, param group {index}: {e}") from None

    def _steps_flat(self) -> bool:
        """Whether this step runs through ``memopt_func.compiled``'s ``FlatSteps``: under an
        enclosing torch.compile, and at every step after one did, until ``load_state_dict``.
        Traced tensor by tensor, a step over many parameters compiles for minutes (Inductor's
        work grows faster than the number of tensors); a flat stepper compiles one graph whose
        size does not depend on it, with every hyperparameter that changes held in a tensor.
        Steps that flat steppers do not take stay traced per tensor: ``differentiable=True``,
        complex and DTensor (sharded) parameters."""
        fits = self.__dict__.get("_flat_fits", False) and not self.defaults.get("differentiable", False)
        if "_flat_steps" in self.__dict__:
            if fits:
                return True
            # a param group that flat steppers cannot step was added: every group goes back to
            # the rule's own step, which reads and writes the state entries in place of the steppers
            del self.__dict__["_flat_steps"]
        return fits and (torch.compiler.is_compiling() or _compile_callback() is not None)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        """The step, per param group through the rule (see ``step``)."""
        loss = evaluate_closure(closure)
        differentiable = self.defaults.get("differentiable", False)
        with torch.set_grad_enabled(differentiable):
            jobs = [job for job in map(self._prepare, range(len(self.param_groups))) if job is not None]
            for group, rule, prepared, state in jobs:
                if differentiable:  # the step reads copies: the parameters' old values stay in the graph
                    prepared = _tree.replace(prepared, leaves=[v.clone() for v in prepared.leaves])
                new_params, new_state = rule.run(prepared, state, donate=not differentiable, scratch=self._scratch(prepared))
                views = real(group["params"])
                moved = [i for i in prepared.idx if new_params[i] is not views[i]]
                if differentiable:  # recorded by autograd, which _foreach_copy_ is not
                    for i in moved:
                        views[i].copy_(new_params[i])
                elif moved:  # a donated step updates the parameters in place already
                    torch._foreach_copy_(_tree.take(views, moved), _tree.take(new_params, moved))
                self.groups.store(group, rule, new_state)
                if not torch.compiler.is_compiling():
                    self.groups.remember(group, rule)
        return loss

    @torch.compiler.disable
    def _flat_step(self, closure: Callable[[], Any] | None) -> Any:
        """The step through ``FlatSteps``, outside any traced frame: each group's ``Stepper``
        compiles its own graph. At the first such step the parameters become views into the flat
        buffers and the state entries views into the flat state, as for the compiled drop-ins."""
        steps = self.__dict__.get("_flat_steps")
        if steps is None:
            if _FLAT_STEPPING["factory"] is None:  # only if memopt_func.compiled failed to import
                raise RuntimeError("torch.compile(opt.step) needs memopt_func.compiled, which is not imported")
            steps = self.__dict__["_flat_steps"] = _FLAT_STEPPING["factory"](self)
            self.__dict__.pop("_group_steps", None)  # its steppers' state is adopted afresh
        return steps.step(closure)

    def _scratch(self, prepared) -> Scratch | None:
        """The optimizer's arena for the temporaries of an eager CPU step (``_scratch``): kept
        from step to step, so that large temporaries cost no fresh pages each step."""
        if prepared.leaves[0].device.type != "cpu" or torch.compiler.is_compiling():
            return None
        scratch = self.__dict__.get("_step_scratch")
        if scratch is None:
            scratch = self.__dict__["_step_scratch"] = Scratch()
        return scratch

    def _prepare(self, index: int):
        """A group's checked step (None when no parameter has a gradient): (group, rule,
        prepared inputs, state). Changes nothing."""
        group = self.param_groups[index]
        params = group["params"]
        grads = [p.grad for p in params]
        if all(g is None for g in grads):
            return None
        views = real(params)
        try:
            rule = self.groups.rule(group)
            if self.state.get(params[0]):
                self.groups.check_layout_kept(group, rule, views)
            state = self.groups.state(group, rule, views, store=False)
            per_step = {name: group[name] for name in rule.dynamic_names()}
            chunk = self.cpu_chunk_numel if params[0].device.type == "cpu" else None
            grads = [None if g is None else (torch.view_as_real(g) if g.is_complex() else g) for g in grads]
            prepared = rule.prepare(
                views, grads, state, chunk_numel=chunk, state_checked=self.groups.unchanged(group, rule), **per_step
            )
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}, param group {index}: {e}") from None
        return group, rule, prepared, state

    def _init_group(self, group: dict[str, Any]) -> None:
        """Before a group's first step under torch.compile, its fresh state, made untraced
        (``_prepare_untraced``), so the first step compiles to the same graph as every later one.
        A bad value is left to the traced checks, which raise it."""
        try:
            rule = self.groups.rule(group)
            if not self.state.get(group["params"][0]):
                self.groups.store(group, rule, rule.init(real(group["params"])))
        except ValueError:
            pass

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim: tensors move to their parameter's device; each entry takes the dtype a
        fresh state would have for that parameter (so integer counters stay integers and
        ``buffer_dtype`` buffers keep their dtype)."""
        kept = (self.state, self.param_groups, self._stats_offset, self.groups.laid_out, self.groups.stepped)
        self.state = type(self.state)(self.state.default_factory, self.state)
        try:
            self._load(state_dict)
        except Exception:
            self.state, self.param_groups, self._stats_offset, self.groups.laid_out, self.groups.stepped = kept
            raise
        self.__dict__.pop("_flat_steps", None)  # a later step under torch.compile adopts the loaded state
        self.__dict__.pop("_group_steps", None)  # ... and so does a later grouped eager step

    def _load(self, state_dict: dict[str, Any]) -> None:
        """Read a state_dict of any format this project wrote (``memopt_func.checkpoint``)."""
        name = type(self).__name__
        checkpoint.check_readable(state_dict, name, self.RULE.__name__)
        saved = state_dict["state"]
        names = [h.name for h in self.RULE.HYPERS]
        groups = []
        for i, group in enumerate(state_dict["param_groups"]):
            group = checkpoint.upgrade_group(group, i, names, self.defaults, name)
            self.RULE(**{n: layout_value(group[n]) for n in names})
            groups.append({"differentiable": self.defaults["differentiable"], **group})
        super().load_state_dict({"state": {}, "param_groups": groups})
        self._stats_offset = {}
        self.groups.forget()  # the replaced state is checked, and no longer held
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for group in self.param_groups:
            params = group["params"]
            rule = self.groups.rule(group)
            wanted = explode(self.groups.template(group, rule, real(params)), len(params), self.groups.synced(rule))
            for p, want in zip(params, wanted):
                pid = ids.pop(0)
                if pid not in saved:
                    continue
                entry = checkpoint.upgrade_entry(saved[pid], want, lambda t, p=p: torch.zeros_like(t, device=p.device))
                missing = sorted(set(want) - set(entry))
                if missing:
                    raise ValueError(f"state_dict entry for parameter {pid} lacks {missing}")
                self.state[p] = {k: _entry(v, want.get(k), p.device) for k, v in entry.items()}
            if self.state.get(params[0]):
                self.groups.record_layout(group, rule)
            self._check_loaded(group, rule)

    def _check_loaded(self, group: dict[str, Any], rule: Rule) -> None:
        """Refuse loaded state whose shapes do not fit the group's rule (e.g. topC 5 into topC 3)."""
        params = group["params"]
        if not self.state.get(params[0]):
            return
        try:
            rule.check_state(self.groups.state(group, rule, real(params), store=False), real(params))
        except (ValueError, KeyError, RuntimeError) as e:
            for p in params:
                self.state.pop(p, None)
            raise ValueError(f"{type(self).__name__}: the loaded state does not fit its param group: {e}") from None

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim, plus the rule's name (a load into another class is refused) and the
        format (``memopt_func.checkpoint``: every later version loads it)."""
        out = super().state_dict()
        out[checkpoint.KEY] = checkpoint.header(self.RULE.__name__)
        return out

    def _admission_counts(self, group: dict[str, Any]) -> dict[str, int]:
        counts = {"offers": 0, "accepted": 0, "filled": 0, "nonfinite": 0}
        for p in group["params"]:
            entry = self.state.get(p, {})
            if "critical_offers" in entry:
                counts["offers"] += int(entry["critical_offers"].sum())
                counts["accepted"] += int(entry["critical_accepted"].sum())
                counts["filled"] += int(entry["critical_count"].sum())
                counts["nonfinite"] += int(entry["critical_nonfinite"].sum())
        return counts

    def get_offline_stats(self) -> dict[str, Any]:
        """Critical-buffer admission counts since construction or the last ``reset_offline_stats``.

        ``yes`` / ``no``: offers to a full buffer that were admitted / refused (the published
        package's two keys); ``offers``, ``accepted`` (fill-phase admissions included) and
        ``refused``: all offers. A synced group counts one offer per step, a per-tensor group one
        per tensor. Reads device counters, so call it between steps, not inside a compiled region.
        """
        per_group = []
        for gi, group in enumerate(self.param_groups):
            now, offset = self._admission_counts(group), self._stats_offset.get(gi, {})
            c = {k: v - offset.get(k, 0) for k, v in now.items()}
            refused = c["offers"] - c["accepted"]
            per_group.append(
                {
                    "yes": c["accepted"] - c["filled"], "no": refused, "offers": c["offers"],
                    "accepted": c["accepted"], "refused": refused, "nonfinite": c["nonfinite"],
                }
            )
        total = {k: sum(g[k] for g in per_group) for k in ("yes", "no", "offers", "accepted", "refused", "nonfinite")}
        return {**total, "groups": per_group}

    def reset_offline_stats(self) -> None:
        """Start the counts of ``get_offline_stats`` from zero (the critical_test draw counter goes on)."""
        self._stats_offset = {gi: self._admission_counts(g) for gi, g in enumerate(self.param_groups)}


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss, computed with gradients enabled (None without a closure), as
    torch.optim's steps compute it."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _entry(value: Any, want: Tensor | None, device: torch.device) -> Any:
    """A loaded state entry as a fresh state would hold it: on the parameter's device, in the
    dtype a fresh state has (a Python number, as old or foreign checkpoints store ``step``, included)."""
    if want is None:
        return value
    if not isinstance(value, Tensor):
        return torch.tensor(value, dtype=want.dtype, device=device).reshape(want.shape)
    return value.to(device=device, dtype=want.dtype)


# The registered optimizers' drop-ins (``memopt_func.registry`` gives each its rule and positional
# order). Written out for readers and static tools; a registered one without a line here is made
# on first use (``optimizer_class``, or the module's ``__getattr__``).


class Adam_CM(MemoryOptimizer):
    """Adam with critical momenta; the published ``cmoptimizer`` signature (SPEC.md, "Adam_CM")."""


class Adam_C(MemoryOptimizer):
    """Adam with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "Adam_C")."""


class RMSprop_C(MemoryOptimizer):
    """RMSprop with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "RMSprop_C")."""


class SGD_C(MemoryOptimizer):
    """SGD with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "SGD_C")."""


class AdEMAMix(MemoryOptimizer):
    """AdEMAMix; the signature of the paper's PyTorch reference (SPEC.md, "AdEMAMix")."""


_FROM_RULE: dict[type[Rule], type[MemoryOptimizer]] = {
    cls.RULE: cls for cls in (Adam_CM, Adam_C, RMSprop_C, SGD_C, AdEMAMix)
}


def optimizer_class(rule_cls: type[Rule]) -> type[MemoryOptimizer]:
    """The drop-in optimizer class of a rule class: a registered optimizer's (named as it is,
    with its positional order), else ``<Rule>Optimizer`` taking every hyperparameter by keyword
    or in the rule's order."""
    cls = _FROM_RULE.get(rule_cls)
    if cls is None:
        named = registry.NAMED.get(rule_cls.__name__)
        if named is not None and named.rule is rule_cls:
            body = {"__doc__": named.doc, "__module__": __name__}
            cls = type(named.name, (MemoryOptimizer,), body)
        else:
            body = {"RULE": rule_cls, "__doc__": f"Drop-in optimizer over the rule {rule_cls.__name__}.", "__module__": __name__}
            cls = type(f"{rule_cls.__name__}Optimizer", (MemoryOptimizer,), body)
        _FROM_RULE[rule_cls] = cls
    return cls


def __getattr__(name: str) -> type[MemoryOptimizer]:
    """The drop-in of a registered optimizer without a class statement above, by its name."""
    if name in registry.NAMED:
        return optimizer_class(registry.NAMED[name].rule)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_rule(params: Iterable, rule: Rule, *, differentiable: bool = False) -> MemoryOptimizer:
    """A ``torch.optim.Optimizer`` stepping ``rule`` (any rule of this package, for example one
    made by ``rules.with_critical_buffer``) over ``params``, with the rule's hyperparameters as its
    defaults: param groups, ``state_dict``, schedulers and ``compiled.compile_optimizer`` as for
    the named drop-ins."""
    if not isinstance(rule, Rule):
        raise TypeError(f"from_rule takes a memopt_func rule, got {type(rule).__name__}")
    return optimizer_class(type(rule))(params, differentiable=differentiable, **rule.hyper)


__all__ = ["MemoryOptimizer", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix", "from_rule", "optimizer_class"]
