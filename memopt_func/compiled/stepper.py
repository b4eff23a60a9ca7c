"""A fast stepper for any functional rule: persistent state updated in place by one compiled step.

The rule's pure step runs under ``torch.compile(fullgraph=True)`` and its outputs are copied
back into persistent tensors in the same graph, so Inductor fuses the copy-back into the update
kernels (each state byte read and written once). Per-step hyperparameters live in persistent
0-d tensors, so changing the learning rate never recompiles (a zero weight decay stays a
constant, dropping its term, until it is set non-zero). On CUDA the compiled step can be
captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from memopt_func import _tree, checkpoint, sharding
from memopt_func._tree import Runs
from memopt_func import critical_buffer as cb
from memopt_func.groups import GroupStates, explode
from memopt_func.rules import Rule

from . import cpu_codegen
from .hyper_tensors import ZERO_IS_CONSTANT, as_tensor, hold, kinds, same_number
from .flat import FlatLayout, flat_state, per_tensor_steps, per_tensor_views, steps_agree


def flat_refusal(rule: Rule, grouped: bool = False) -> str | None:
    """Why a rule's state cannot be laid out flat (None if it can): a per-tensor critical buffer
    (synced=False) keeps one decision per tensor; 8-bit state is quantized in blocks of one
    tensor; stochastic rounding draws per tensor element, which the grouped (uncompiled) flat
    step keeps (``storage.store_float_runs``) and the compiled one does not yet."""
    if "synced" in rule.hyper and not rule.hyper["synced"] and rule.hyper["kappa"] != 0 and rule.hyper["topC"] > 0:
        return "needs synced=True (or no buffer): a per-tensor critical buffer cannot be flattened"
    if rule.storage.quantizes:
        return "does not take 8-bit state (torch.int8 state_dtype or buffer_dtype), which is quantized tensor by tensor"
    if rule.storage.draws and not grouped:
        return "does not take stochastic rounding, whose draws are made per tensor element (use rounding='nearest')"
    return None


class Stepper:
    """Steps a rule over persistent parameters and state, compiled, optionally as a CUDA graph.

    ``params``: a pytree of tensors that the stepper updates in place. With ``flat=True`` (the
    default whenever the rule allows it) the stepper copies them into one buffer per
    (device, dtype) and re-points ``nn.Parameter`` leaves at views of it, so a module keeps
    training the same storage; ``stepper.params`` holds the views either way.
    ``state``: an initial per-tensor state to adopt (e.g. from a checkpoint); default ``rule.init``.
    ``cuda_graph``: replay each step as one captured CUDA graph (the default for a compiled flat
    stepper on CUDA). A per-tensor stepper (``flat=False``, or a rule that needs it, such as
    8-bit or stochastically rounded state) steps without a graph: a step may skip tensors
    without gradients, which one captured graph cannot.
    ``compile_options``: keyword arguments for ``torch.compile`` over the stepper's own
    (``fullgraph=True, dynamic=False``); an ``options`` dict among them is merged over the
    stepper's Inductor options (``emulate_precision_casts``, and on an x86 CPU with 512-bit
    vectors ``cpp.march`` from ``cpu_codegen``: give your own ``cpp.march`` to replace it), and
    a ``mode`` comes in as the options it stands for.
    ``grouped``: the eager drop-ins' step on an accelerator (``MemoryOptimizer._steps_grouped``;
    needs ``compile=False``): the flat buffers keep the parameters' order, a critical slot is
    written without a sink row, and per-step hyperparameters go to the rule as given, so the
    numbers are those of the per-tensor eager step (where the device's element-wise kernels
    compute each element alike, as a GPU's do).
    """

    def __init__(
        self,
        rule: Rule,
        params: Any,
        *,
        state: NamedTuple | None = None,
        flat: bool | None = None,
        compile: bool = True,
        cuda_graph: bool | None = None,
        compile_options: dict[str, Any] | None = None,
        grouped: bool = False,
    ) -> None:
        if grouped and compile:
            raise ValueError("grouped=True is the eager drop-ins' uncompiled flat step: it needs compile=False")
        all_leaves, self._spec = pytree.tree_flatten(params)
        if not all_leaves or not all(isinstance(t, Tensor) for t in all_leaves):
            raise ValueError("params must be a non-empty pytree of tensors")
        if sharding.any_sharded(all_leaves):
            raise NotImplementedError(
                "Stepper does not step DTensor (FSDP2-sharded) tensors yet; step them with the rule itself "
                "(rule.step works on DTensors) or the eager drop-in in memopt_func.optim"
            )
        for i, t in enumerate(all_leaves):
            if t.is_complex():
                raise ValueError(
                    f"params leaf {i} is complex ({t.dtype}); compiled stepping takes real tensors "
                    "(use the eager drop-in, which steps complex parameters as real views, or torch.view_as_real)"
                )
        # A frozen tensor (requires_grad=False beside tensors that require grad) is never stepped.
        trainable = any(t.requires_grad for t in all_leaves)
        self._active = [i for i, t in enumerate(all_leaves) if t.requires_grad or not trainable]
        self._all_leaves = all_leaves
        leaves = [all_leaves[i] for i in self._active]
        self.rule = rule
        if state is None:
            state = rule.init([t.detach() for t in leaves])
        else:
            rule.check_state(state, leaves)
        refusal = flat_refusal(rule, grouped)
        if flat is None:
            flat = not refusal and steps_agree(state.step, FlatLayout(leaves))
        elif flat and refusal:
            raise ValueError(f"flat=True {refusal}")
        self.flat = flat
        self._leaves = leaves
        if flat:
            self.layout = FlatLayout(leaves, by_size=not grouped)
            self._step_params = self.layout.flatten([t.detach() for t in leaves])
            views = self.layout.views(self._step_params)
            for leaf, view in zip(leaves, views):
                leaf.data = view
            if grouped:  # gradients copied into a flat buffer of the step's own, freed after it
                self._grads, self._grad_views = None, None
            else:  # kept, with each .grad a view of it, so that backward accumulates into it
                self._grads = [torch.zeros_like(f) for f in self._step_params]
                self._grad_views = self.layout.views(self._grads)
            self._segments = [
                Runs(runs, [s.index for s in self.layout.members(g) if s.numel > 0]) for g, runs in enumerate(self.layout.runs)
            ]
            state = flat_state(state, self.layout)
            if not grouped and not _slots_on_host(leaves[0].device):
                # A sink row after each critical buffer's slots takes the refused elements (see
                # critical_buffer.write): the slot write then needs no temporary under Inductor.
                state = cb.map_buffers(state, cb.with_sink)
        else:
            self.layout = None
            self._step_params = [t.detach() for t in leaves]
            self._grads = None
            self._segments = None
        self._step_state = state
        self._held = None  # (the tensors stepped, each parameter's pointer, dtype, shape): holds_params
        device = self._step_params[0].device
        # Each per-step hyperparameter lives in a 0-d tensor (a new lr recompiles nothing);
        # grouped, the step takes the values as given, as the eager drop-ins do (a Python float
        # stays a float: the same kernels, the same numbers).
        self.grouped = grouped
        self._hyper = {
            name: rule.hyper[name] if grouped else as_tensor(rule.hyper[name], device, name in ZERO_IS_CONSTANT)
            for name in rule.dynamic_names()
        }
        # the plain numbers that the step's hyperparameter tensors hold (None: unknown, e.g. a tensor
        # was given), so that a step given the same numbers again writes nothing to the device
        self._numbers: dict[str, Any] = {name: rule.hyper[name] for name in rule.dynamic_names()}
        if cuda_graph is None:
            cuda_graph = compile and device.type == "cuda" and flat
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs CUDA tensors")
        if cuda_graph and not flat:
            raise ValueError(
                "cuda_graph=True needs a flat stepper (flat=False was given, or the rule steps per tensor: "
                f"{flat_refusal(rule) or 'flat=False'}); leave cuda_graph unset to step without a graph"
            )
        self.cuda_graph = cuda_graph
        self._graph = None
        self._warmup_left = 3
        # meta tensors have no values to compute: their steps run uncompiled (shapes only)
        self._compiled = compile and device.type != "meta"
        # emulate_precision_casts: a value stored in a lower buffer_dtype must round exactly as in
        # eager, or buf_sum drifts from the sum of the stored slots.
        # cpu_codegen: the compiler's own loops (float32 <-> float64) in 512-bit vectors on such CPUs
        codegen = cpu_codegen.inductor_options(device) if self._compiled else {}
        inductor = {"emulate_precision_casts": True, **codegen}
        options = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
        # torch.compile takes a mode or options, not both: a mode given comes in as its options
        mode = options.pop("mode", None)
        mode_options = {}
        if mode is not None:
            from torch._inductor import list_mode_options

            mode_options = list_mode_options(mode)
        options["options"] = {**mode_options, **inductor, **options.get("options", {})}
        self._compile_options = options
        self._fn = torch.compile(_own_code(self._apply), **options) if self._compiled else self._apply

    @property
    def params(self) -> Any:
        """The parameters as the pytree given (stepped ones as views into the flat buffers when flat)."""
        stepped = self.layout.views(self._step_params) if self.flat else self._leaves
        out = list(self._all_leaves)
        for i, t in zip(self._active, stepped):
            out[i] = t
        return pytree.tree_unflatten(out, self._spec)

    def holds_params(self) -> bool:
        """Whether each stepped parameter still holds the storage this stepper steps (the view of
        its flat buffer, or its own tensor): False once something re-pointed ``param.data``
        (``module.to(...)``, a new ``data``), after which this stepper would step stale copies."""
        if self._held is None or self._held[0] is not self._step_params:
            mine = self.layout.views(self._step_params) if self.flat else self._step_params
            self._held = (self._step_params, [(t.data_ptr(), t.dtype, t.shape) for t in mine])
        # a pointer, dtype and shape per parameter: no tensor is made (this runs every step)
        return all(leaf.data_ptr() == ptr and leaf.dtype == dtype and leaf.shape == shape for leaf, (ptr, dtype, shape) in zip(self._leaves, self._held[1]))

    @property
    def leaves(self) -> list[Tensor]:
        """The tensors this stepper steps, in order (the parameters it was given that it steps)."""
        return self._leaves

    @property
    def stepped(self) -> list[int]:
        """Positions (among the flattened params) of the tensors this stepper steps; the others
        are frozen (``requires_grad=False`` beside tensors that require grad) and never touched."""
        return list(self._active)

    @property
    def state(self) -> NamedTuple:
        """The live state, laid out as the rule's own (flat when flat): tensors the steps update."""
        return cb.map_buffers(self._step_state, cb.without_sink) if self.flat else self._step_state

    def per_tensor_state(self) -> NamedTuple:
        """The state as one entry per tensor (views into the flat state when flat)."""
        if self.flat:
            return per_tensor_views(self.state, self.layout)
        return self.state

    def state_dict(self) -> dict[str, Any]:
        """The state as a drop-in's ``state_dict`` holds it (plain tensors, copied): under
        ``"state"``, per stepped tensor (keyed by its position among the flattened params, as in
        ``stepped``) the rule's fields by name; and the rule's name with the format
        (``memopt_func.checkpoint``), so that later versions load it."""
        entries = explode(self.per_tensor_state(), len(self._leaves), GroupStates.synced(self.rule))
        state = {i: {k: v.detach().clone() for k, v in e.items()} for i, e in zip(self._active, entries)}
        return {"state": state, checkpoint.KEY: checkpoint.header(type(self.rule).__name__)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a ``state_dict()`` of a stepper of the same rule over the same tensors into this
        stepper's live state (in place: the compiled step and a captured CUDA graph stay valid).
        Entries that later formats added start at zero. Everything is checked first: a
        ValueError, naming what does not fit, leaves the state as it was."""
        rule_name = type(self.rule).__name__
        saved = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict) or not all(isinstance(e, dict) for e in saved.values()):
            raise ValueError("a Stepper state_dict is a dict with a 'state' dict of dicts (Stepper.state_dict())")
        checkpoint.check_readable(state_dict, "this Stepper", rule_name)
        pairs = []
        for i, want in zip(self._active, explode(self.per_tensor_state(), len(self._leaves), GroupStates.synced(self.rule))):
            if i not in saved:
                raise ValueError(f"the state_dict has no entry for stepped tensor {i} (stepped: {self.stepped})")
            entry = checkpoint.upgrade_entry(saved[i], want, torch.zeros_like)
            if set(entry) != set(want):
                raise ValueError(
                    f"the state_dict entry of tensor {i} has {sorted(entry)}, this {rule_name} stepper keeps {sorted(want)}"
                )
            for key, dst in want.items():
                src = entry[key]
                if not isinstance(src, Tensor) or src.shape != dst.shape:
                    got = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
                    raise ValueError(f"the state_dict entry {key!r} of tensor {i} is {got}, this stepper keeps {tuple(dst.shape)}")
                pairs.append((dst, src))
        if self.flat:
            steps = [entry["step"] for entry in (saved[i] for i in self._active)]
            for g in range(self.layout.num_groups):
                members = [steps[s.index] for s in self.layout.members(g)]
                if any(not torch.equal(m.cpu(), members[0].cpu()) for m in members):
                    raise ValueError(
                        "the state_dict's tensors have taken different numbers of steps, which this flat stepper "
                        "cannot hold (one counter per flat buffer); load it into a Stepper made with flat=False"
                    )
        for dst, src in pairs:
            dst.copy_(src)

    def set_hyper(self, **per_step: Any) -> None:
        """Set per-step hyperparameters (floats or 0-d tensors) for the following steps."""
        if self.grouped:  # the values as given
            self.rule.resolve(per_step)  # validates names and values
            self._hyper.update(per_step)
            return
        if all(same_number(self._numbers.get(name), value) for name, value in per_step.items()):
            return  # the numbers the step tensors already hold (checked when they were set)
        self.rule.resolve(per_step)  # validates names and values
        for name, value in per_step.items():
            self._numbers[name] = value if same_number(value, value) else None
            old = self._hyper[name]
            self._hyper[name] = hold(old, value, self._step_params[0].device, name in ZERO_IS_CONSTANT)
            if kinds(old) != kinds(self._hyper[name]):
                # a zero constant became a tensor: the next step compiles again (once), and a
                # captured CUDA graph, which holds the constant, is captured afresh
                self._graph, self._warmup_left = None, 3

    def _apply(self, params: list[Tensor], grads: list[Tensor | None], state: NamedTuple, hyper: dict) -> list[Tensor]:
        """One step in place; returns the new values of the 0-d float64 CPU state tensors, which
        the caller writes (torch.compile drops an in-place write to such a graph input)."""
        new_params, new_state = self.rule.step(
            params, grads, state, donate=True, segments=self._segments, **hyper
        )
        moved = [i for i, g in enumerate(grads) if g is not None and new_params[i] is not params[i]]
        if moved:
            torch._foreach_copy_([params[i] for i in moved], [new_params[i] for i in moved])
        late, copies = [], []
        for dst, src in zip(pytree.tree_leaves(state), pytree.tree_leaves(new_state)):
            if _scalar64(dst):
                late.append(src)
            elif dst is not src:
                copies.append((dst, src))
        if self.grouped and copies:  # grouped: the small state tensors (keys, counters) in one op
            torch._foreach_copy_([d for d, _ in copies], [s for _, s in copies])
        else:
            for dst, src in copies:
                dst.copy_(src)
        return late

    def _run(self, grads: list[Tensor | None]) -> None:
        """``_fn`` once, then the writes it hands back (see ``_apply``)."""
        with _host_scalars(self._step_params[0].device):
            late = self._fn(self._step_params, grads, self._step_state, self._hyper)
        for dst, value in zip([t for t in pytree.tree_leaves(self._step_state) if _scalar64(t)], late):
            dst.copy_(value)

    def _given_grads(self, grads: Any) -> list[Tensor | None]:
        """The gradients of the stepped tensors: their ``.grad``, or the given pytree's leaves."""
        if grads is None:
            return [t.grad for t in self._leaves]
        given = pytree.tree_flatten(grads, is_leaf=lambda x: x is None)[0]
        if len(given) != len(self._all_leaves):
            raise ValueError(f"grads have {len(given)} leaves but params have {len(self._all_leaves)}")
        frozen = sorted(set(range(len(given))) - set(self._active))
        for i in frozen:
            if given[i] is not None:
                raise ValueError(
                    f"grads leaf {i} is given, but params leaf {i} is frozen (requires_grad=False) and is "
                    "never stepped; pass None there"
                )
        return [given[i] for i in self._active]

    def grads_in_place(self, params: list[Tensor]) -> bool:
        """Whether params are exactly this flat stepper's tensors and each ``.grad`` is still the
        view of the flat gradient buffer that the stepper installed (so shapes, dtypes and devices
        need no check)."""
        if not self.flat or self._grad_views is None or len(params) != len(self._leaves):
            return False
        return all(p is leaf and p.grad is view for p, leaf, view in zip(params, self._leaves, self._grad_views))

    def check(self, grads: Any = None, **per_step: Any) -> None:
        """Raise ValueError if a step with these gradients and hyperparameters would fail its
        checks; changes nothing (a caller stepping several steppers checks them all first)."""
        given = self._given_grads(grads)
        _tree.flatten_grads(given, pytree.tree_structure(list(self._leaves)), self._leaves)
        if per_step:
            self.rule.resolve(per_step)

    def _load_grads(self, grads: Any) -> list[Tensor | None]:
        given = self._given_grads(grads)
        if all(g is None for g in given):
            return None
        if self.flat and any(g is None for g in given):
            self._leave_flat()
        if not self.flat:
            return given
        if self._grad_views is None:  # grouped: the step's own flat copy of the gradients
            flats = [torch.empty_like(f) for f in self._step_params]
            torch._foreach_copy_(self.layout.views(flats), given)
            return flats
        copies = [(v, g) for v, g in zip(self._grad_views, given) if g.data_ptr() != v.data_ptr()]
        if copies:
            torch._foreach_copy_([v for v, _ in copies], [g for _, g in copies])
        if grads is None:
            for leaf, view in zip(self._leaves, self._grad_views):
                if leaf.grad is not view:
                    leaf.grad = view  # later backward passes accumulate straight into the flat buffer
        return list(self._grads)

    def _leave_flat(self) -> None:
        """From now on, step tensor by tensor: a step without a gradient for some tensor skips it
        (its parameter and state untouched, its step counter held, as torch.optim does), which one
        flat buffer with one step counter cannot express. The state moves out of the flat
        buffers once (the critical slots are copied: views of one buffer's rows would alias each
        other as inputs of the compiled step; the rest stay views of the flat storage), and the
        per-tensor step compiles once for each pattern of missing gradients."""
        state = per_tensor_steps(self.state, self.layout)
        self._step_state = cb.map_buffers(state, lambda c: _tree.replace(c, buf=tuple(_own(b) for b in c.buf)))
        self._step_params = [t.detach() for t in self._leaves]
        self.flat, self.layout, self._grads, self._grad_views, self._segments = False, None, None, None, None
        self.cuda_graph, self._graph = False, None
        self._fn = torch.compile(_own_code(self._apply), **self._compile_options) if self._compiled else self._apply

    def zero_grad(self) -> None:
        """Zero the gradients in place, keeping a flat stepper's gradient views installed."""
        if self.flat and self._grads is not None:
            for g in self._grads:
                g.zero_()
            for leaf, view in zip(self._leaves, self._grad_views):
                leaf.grad = view
        else:
            for leaf in self._leaves:
                leaf.grad = None

    @torch.no_grad()
    def step(self, grads: Any = None, **per_step: Any) -> None:
        """One update. ``grads``: a pytree like params (default: each param's ``.grad``)."""
        if per_step:
            self.set_hyper(**per_step)
        step_grads = self._load_grads(grads)
        if step_grads is None or all(g is None for g in step_grads):
            return
        if not self.cuda_graph:
            self._run(step_grads)
            return
        self._step_cuda_graph(step_grads)

    def _step_cuda_graph(self, grads: list[Tensor | None]) -> None:
        if not self.flat:
            raise ValueError("CUDA-graph stepping needs a gradient for every tensor at fixed addresses (use flat=True)")
        if self._graph is not None:
            self._graph.replay()
            return
        # The first calls are real steps run on a side stream (compilation and warm-up, as CUDA
        # graph capture requires); after the last of them the step is captured, which records
        # kernels without running them, so every later call is exactly one replayed step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._fn(self._step_params, grads, self._step_state, self._hyper)
        torch.cuda.current_stream().wait_stream(stream)
        self._warmup_left -= 1
        if self._warmup_left == 0:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._fn(self._step_params, grads, self._step_state, self._hyper)


def _slots_on_host(device: torch.device) -> bool:
    """Whether steps on device read a critical buffer's slot index on the host, and so update
    the chosen row in place in one pass (``critical_buffer.slot_on_host``): on a CPU, where
    reading a tensor's value costs nothing. An accelerator's flat leaves write through a sink row."""
    return device.type == "cpu"


def _host_scalars(device: torch.device) -> Any:
    """Where slots are read on the host, the compiled step traces ``Tensor.item()`` into the
    graph (``capture_scalar_outputs``) instead of breaking it there."""
    if not _slots_on_host(device):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(capture_scalar_outputs=True)


_stepper_ids = itertools.count()


def _own_code(method: Any) -> Any:
    """The bound method over a private copy of its code object. Dynamo keeps its compiled-graph
    cache per code object, so steppers sharing ``Stepper._apply`` would pile their graphs onto
    one cache and hit the recompile limit; each stepper gets its own instead."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_stepper_ids)}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(fresh, method.__self__)


def _own(buf: Any) -> Any:
    """A copy of a critical buffer's slots (8-bit codes are kept as they are)."""
    return buf.clone() if isinstance(buf, Tensor) else buf


def _scalar64(t: Tensor | None) -> bool:
    return isinstance(t, Tensor) and t.dim() == 0 and t.dtype == torch.float64 and t.device.type == "cpu"


__all__ = ["Stepper", "flat_state", "per_tensor_views"]
