"""The one shape every update rule has: ``rule = Rule(**hyper)``, ``state = rule.init(params)``,
``params, state = rule.step(params, grads, state, **per_step)``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from . import _math as M
from . import _tree, sharding
from . import critical_buffer as cb
from . import storage as _storage
from ._hyper import Hyper
from ._parts import check_chunk_numel, in_parts, runs


Segments = Tuple[Tuple[int, int], ...]


class Prepared(NamedTuple):
    """A step's checked inputs (``Rule.prepare``)."""

    params: Any
    leaves: list[Tensor]
    spec: Any
    grads: list[Tensor | None]
    idx: list[int]
    hyper: dict[str, Any]
    segments: list | None
    chunk_numel: int | None


class StepContext(NamedTuple):
    """How a step runs, as opposed to what it computes."""

    donate: bool
    segments: list[Segments | None] | None  # per present leaf, see Rule.step
    parts: list[list[int]]  # positions among the present leaves, a run at a time, see Rule.step
    norms: Any = None  # a sharding.NormReducer when the leaves are shards of DTensors
    scratch: Any = None  # a _scratch.Scratch for the temporaries of an eager donated step
    chunk: int | None = None  # a leaf larger than this runs a slice at a time (see in_parts), if not None


class Rule:
    """Base of all update rules: validated hyperparameters plus a pure ``step`` over pytrees.

    Subclasses declare ``HYPERS`` and implement ``_init(leaves)`` and
    ``_update(params, grads, state, idx, h, ctx)`` over the leaves that have a gradient
    (``idx`` are their positions among all leaves; per-leaf state tuples are indexed by position;
    ``ctx`` is the step's ``StepContext``). ``_update`` sees one of ``ctx.parts`` at a time; a rule
    with group-wide work (the critical buffer's admission) overrides ``_update_all`` instead.
    """

    HYPERS: ClassVar[tuple[Hyper, ...]] = ()
    #: ``_update`` is element-wise within each leaf (no reduction over a leaf's elements, state
    #: shaped like the leaf, optionally with leading dims), so an eager CPU step may run a large
    #: leaf a slice at a time (``chunk_numel``) with the same numbers. Off unless declared.
    ELEMENTWISE: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # storage settings and the seed come last, after a combined rule's own hyperparameters
        last = ("state_dtype", "rounding", "param_rounding", "seed")
        cls.HYPERS = tuple(h for h in cls.HYPERS if h.name not in last) + tuple(
            h for name in last for h in cls.HYPERS if h.name == name
        )
        cls.__signature__ = inspect.Signature(
            [inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=h.default) for h in cls.HYPERS]
        )

    def __init__(self, **hyper: Any) -> None:
        known = {h.name: h for h in self.HYPERS}
        unknown = sorted(set(hyper) - set(known))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown hyperparameter(s) {unknown}; it takes {sorted(known)}")
        self.hyper: dict[str, Any] = {}
        for h in self.HYPERS:
            value = h.check(h.name, hyper.get(h.name, h.default))
            if not h.dynamic and isinstance(value, Tensor):
                value = float(value)  # fixed for the rule's life: read once here, never in a step
            self.hyper[h.name] = value
        self._check_combination(self.hyper)
        self._storage = _storage.storage_of(self)
        self._layouts: dict[tuple, NamedTuple] = {}  # fresh-state templates by parameter shapes (check_state)

    def _check_combination(self, h: dict[str, Any]) -> None:
        """Cross-argument checks; raise ValueError."""

    @classmethod
    def dynamic_names(cls) -> tuple[str, ...]:
        """Hyperparameters that may be passed to ``step`` (as floats or 0-d tensors) each step."""
        return tuple(h.name for h in cls.HYPERS if h.dynamic)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"

    def init(self, params: Any) -> NamedTuple:
        """Fresh state for a parameter pytree: zeros on the parameters' device (for DTensor
        parameters, DTensors sharded like them; see ``sharding``)."""
        leaves, _ = _tree.flatten_params(params)
        leaves = [p.detach() for p in leaves]
        if not sharding.any_sharded(leaves):
            return self._fresh(leaves)
        self._refuse_sharded_codes()
        local = [sharding.local(p) for p in leaves]
        return sharding.globalize(self._fresh(local), leaves)

    def fresh_state(self, leaves: list[Tensor]) -> NamedTuple:
        """A fresh state over a list of tensors (local tensors, or ``meta`` ones for a template of
        the structure), laid out in its storage; ``init`` without the pytree and DTensor handling."""
        return self._storage.fresh(self._init(leaves), leaves)

    _fresh = fresh_state

    @property
    def storage(self) -> _storage.Storage:
        """How this rule stores its state (``state_dtype``, ``buffer_dtype``, rounding, seed)."""
        return self._storage

    def _refuse_sharded_codes(self) -> None:
        if self._storage.quantizes:
            raise NotImplementedError(
                f"{type(self).__name__}: 8-bit state (state_dtype or buffer_dtype torch.int8) is not supported on "
                "DTensor (FSDP2) parameters; use state_dtype=torch.bfloat16 there, or int8 state with DDP"
            )

    def step(
        self,
        params: Any,
        grads: Any,
        state: NamedTuple,
        *,
        donate: bool = False,
        segments: Sequence[Segments | None] | None = None,
        chunk_numel: int | None = None,
        scratch: Any = None,
        **per_step: Any,
    ):
        """One update: returns ``(new_params, new_state)``; inputs are never mutated.

        ``grads`` has the structure of ``params``; a ``None`` leaf skips that tensor (its
        parameter and own state stay as they are). ``per_step`` overrides any of
        ``dynamic_names()`` for this step only; pass 0-d tensors to keep torch.compile from
        specialising on their values (a float that changes costs one recompile, after which Dynamo
        keeps it symbolic: see ``_lifted``). ``donate=True`` hands ``params`` and ``state`` over to the
        step, which then writes them in place (same numbers, no copies): the returned params and
        state are those tensors, and the old values are gone.
        ``segments`` (one entry per leaf, or None) says that a leaf is several tensors laid end to
        end, as runs ``((count, numel), ...)``: a synced critical buffer then takes its priority
        as the sum of the per-tensor norms, exactly as if the tensors were separate leaves.
        ``chunk_numel`` runs the element-wise work over consecutive runs of leaves of about that
        many elements, one run after the other (group-wide decisions such as a synced buffer's
        admission are still made once): same numbers, but each run's working set stays in cache
        on a CPU. None (the default, and what torch.compile wants) takes all leaves at once.
        ``scratch`` (a ``memopt_func.Scratch`` kept from step to step) serves the temporaries of
        large tensors in an eager donated step from memory it keeps, instead of fresh allocations
        that a CPU faults in again every step; with it, a rule whose update is element-wise
        (``ELEMENTWISE``) runs a leaf larger than ``chunk_numel`` a slice at a time. Same numbers.
        """
        prepared = self.prepare(params, grads, state, segments=segments, chunk_numel=chunk_numel, **per_step)
        return self.run(prepared, state, donate=donate, scratch=scratch)

    def prepare(
        self,
        params: Any,
        grads: Any,
        state: NamedTuple,
        *,
        segments: Sequence[Segments | None] | None = None,
        chunk_numel: int | None = None,
        state_checked: bool = False,
        **per_step: Any,
    ) -> "Prepared":
        """Every check ``step`` makes, with nothing computed or changed: a step's inputs as
        ``run`` takes them. A caller stepping several groups prepares them all first, so that a bad
        input anywhere raises before any group is updated. ``state_checked`` skips the state's
        layout check, for a caller that knows the state is the one this rule's last step returned."""
        leaves, spec = _tree.flatten_params(params)
        gleaves = _tree.flatten_grads(grads, spec, leaves)
        if not state_checked:
            self.check_state(state, leaves)
        h = self._resolve(per_step)
        if per_step and leaves and torch.compiler.is_compiling():
            special = {x.name: x.zero_is_special for x in self.HYPERS}
            h = {**h, **{name: _lifted(h[name], leaves[0].device, special[name]) for name in per_step}}
        segments = _tree.check_segments(segments, leaves)
        check_chunk_numel(chunk_numel)
        idx = [i for i, g in enumerate(gleaves) if g is not None]
        return Prepared(params, leaves, spec, gleaves, idx, h, segments, chunk_numel)

    def run(self, prepared: "Prepared", state: NamedTuple, *, donate: bool = False, scratch=None):
        """The step of prepared inputs (see ``prepare`` and ``step``). ``scratch`` (a
        ``_scratch.Scratch`` kept by the caller from step to step) holds the temporaries of large
        tensors in an eager donated multi-tensor step, instead of fresh allocations."""
        params, leaves, spec, gleaves, idx, h, segments, chunk_numel = prepared
        if not idx:
            return params, state
        present, grads = _tree.take(leaves, idx), _tree.take(gleaves, idx)
        sharded, reducer, local_state = sharding.any_sharded(leaves), None, state
        if sharded:  # step the local shards; norms combined across ranks
            reducer = sharding.NormReducer(present) or None
            present, grads = [sharding.local(t) for t in present], [sharding.local(g) for g in grads]
            local_state = sharding.localize(state, leaves)
            self._refuse_sharded_codes()
        stored_present, stored_state = present, local_state
        store = self._storage if self._storage.active else None
        if store is not None:  # the update sees its inputs at compute precision
            present, grads, local_state = store.decode(present, grads, local_state, idx)
            local_state = cb.decoded_sums(local_state, idx)
        per_tensor = self._per_tensor(h, present, grads)
        donate = donate and not per_tensor
        if not donate or torch.compiler.is_compiling():
            scratch = None
        ctx = StepContext(
            donate=donate,
            segments=_tree.take(segments, idx) if segments else None,
            parts=runs([leaves[i].numel() for i in idx], chunk_numel),
            norms=reducer,
            scratch=scratch,
            chunk=chunk_numel if scratch is not None and self.ELEMENTWISE else None,
        )
        with M.per_tensor_ops(per_tensor), M.using_scratch(scratch):
            if h.get("maximize"):
                grads = M.fe("neg", grads)
            new_present, new_state = self._update_all(present, grads, local_state, idx, h, ctx)
        if store is not None:
            new_present, new_state = store.encode(
                new_present, new_state, stored_present, stored_state, idx, ctx.donate, ctx.segments
            )
            new_state = cb.stored_sums(new_state, idx, ctx.donate)
        if sharded:
            new_present = [
                leaves[i] if n is sharding.local(leaves[i]) else sharding.like(n, leaves[i]) for i, n in zip(idx, new_present)
            ]
            new_state = sharding.globalize(new_state, leaves, before=state)
        return _tree.unflatten(_tree.put(leaves, idx, new_present), spec), new_state

    def _per_tensor(self, h: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """Whether this step runs one op per tensor (see ``_math.per_tensor_ops``): ``foreach=False``;
        or, with ``foreach=None``, inside a ``torch.func`` transform or when autograd records it."""
        choice = h.get("foreach")
        if torch.compiler.is_compiling():  # Inductor fuses either form; the multi-tensor one traces smaller
            return choice is False
        if choice is not None:
            if choice and _transformed(params[0]):
                raise ValueError("foreach=True cannot step under torch.func.vmap; use foreach=None or False")
            return not choice
        if _transformed(params[0]) or _transformed(grads[0]):
            return True
        return torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *grads, *_tensor_values(h)))

    def check_state(self, state: NamedTuple, params: Sequence[Tensor]) -> None:
        """Raise ValueError unless ``state`` is laid out as ``init`` lays it out for params under
        this rule's hyperparameters (e.g. a topC=5 state does not fit a topC=3 rule)."""
        _tree.check_state(state, params, type(self).__name__, _storage.fits)
        if torch.compiler.is_compiling():
            return  # checked when the step was traced from eager inputs; shapes are static here
        key = tuple((tuple(p.shape), p.dtype) for p in params)
        want = self._layouts.get(key)
        if want is None:
            want = self._fresh(_tree.meta_like(params))
            self._layouts[key] = want
        problem = _tree.layout_mismatch(state, want)
        if problem:
            fixed = ", ".join(f"{h.name}={self.hyper[h.name]!r}" for h in self.HYPERS if not h.dynamic)
            raise ValueError(f"{type(self).__name__} state does not fit this rule ({fixed}): {problem}")

    def resolve(self, per_step: dict[str, Any]) -> dict[str, Any]:
        """The hyperparameters a step with these per-step values runs with; ValueError for a
        name that cannot change per step or a value that is not valid (nothing changes)."""
        if not per_step:
            return self.hyper
        dynamic = {h.name: h for h in self.HYPERS if h.dynamic}
        h = dict(self.hyper)
        for name, value in per_step.items():
            if name not in dynamic:
                raise ValueError(
                    f"{name!r} cannot change per step in {type(self).__name__}; "
                    f"per-step hyperparameters are {sorted(dynamic)} (build a new rule for others)"
                )
            h[name] = _per_step_value(dynamic[name], value)
        self._check_per_step(h)
        return h

    _resolve = resolve

    def _check_per_step(self, h: dict[str, Any]) -> None:
        """Checks that per-step values keep the state layout valid; raise ValueError."""

    def _init(self, leaves: list[Tensor]) -> NamedTuple:
        raise NotImplementedError

    def _update_all(self, params, grads, state, idx, h, ctx: StepContext):
        """``_update`` over each of ``ctx.parts`` in turn (rules with group-wide steps override this)."""
        return in_parts(self._update, params, grads, state, idx, h, ctx)

    def _update(self, params, grads, state, idx, h, ctx: StepContext):
        raise NotImplementedError


def _transformed(t: Tensor) -> bool:
    """Whether t is a tensor wrapped by a ``torch.func`` transform (vmap, grad, jvp)."""
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # a torch without functorch internals
        return False


def _tensor_values(h: dict[str, Any]) -> list[Tensor]:
    out = []
    for v in h.values():
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, Tensor):
                out.append(x)
    return out


def _per_step_value(hyper: Hyper, value: Any) -> Any:
    """Validate a per-step value; tensors are only shape-checked (reading them would sync)."""
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if not any(isinstance(v, Tensor) for v in parts):
        return hyper.check(hyper.name, value)
    if isinstance(value, (tuple, list)) and len(value) != len(hyper.default):
        raise ValueError(f"invalid {hyper.name}: {value!r} (expected {len(hyper.default)} values)")
    for v in parts:
        if isinstance(v, Tensor) and v.numel() != 1:
            raise ValueError(f"invalid {hyper.name}: a per-step tensor must have one element, got shape {tuple(v.shape)}")
    parts = tuple(v.reshape(()) if isinstance(v, Tensor) and v.dim() else v for v in parts)
    return parts if isinstance(value, (tuple, list)) else parts[0]


def _lifted(value: Any, device: torch.device, keep_zero: bool = True) -> Any:
    """A checked per-step value as a traced step takes it: a Python number becomes a 0-d float64
    tensor on ``device``. Under torch.compile a float that changes every step (a scheduler's lr)
    is symbolic, and Dynamo turns it into a graph input only while tensor ops read it; as
    ``alpha=`` or a foreach scalar it would be made a constant again, recompiling at every new
    value. With ``keep_zero`` (``Hyper.zero_is_special``) a zero stays a number: the rules take
    cheaper forms for it, and the drop-ins' state layout keys on it."""
    if isinstance(value, tuple):
        return tuple(_lifted(v, device, keep_zero) for v in value)
    if isinstance(value, Tensor) or (keep_zero and value == 0):
        return value
    return torch.zeros((), dtype=torch.float64, device=device) + value  # torch.tensor(value) would be a constant


def new_steps(leaves: list[Tensor]) -> Tensor:
    """Per-leaf step counters: float64 so bias corrections match torch.optim's double math."""
    return torch.zeros(len(leaves), dtype=torch.float64, device=leaves[0].device)


def advance(step: Tensor, idx: list[int]) -> Tensor:
    """step + 1 at positions idx."""
    if len(idx) == step.shape[0]:
        return step + 1
    return step.index_add(0, torch.tensor(idx, device=step.device), torch.ones(len(idx), dtype=step.dtype, device=step.device))
