"""Storage precision of optimizer state and parameters (SPEC.md, "Storage precision").

Arithmetic runs in float32 or the parameter's dtype, whichever is wider; only storage changes:

* ``state_dtype`` stores the moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
  ``exp_avg_slow``, ``momentum_buffer``, ``square_avg``, ``grad_avg``) in ``float32``,
  ``bfloat16`` or ``float16``, or as 8-bit block-wise codes (``torch.int8``);
* ``buffer_dtype=torch.int8`` stores the critical slots as 8-bit block-wise codes (a float
  ``buffer_dtype`` is the published packages' cast, kept as it was);
* ``param_rounding="stochastic"`` writes a parameter narrower than float32 (pure-bf16
  training) with stochastic rounding.

How values are rounded and 8-bit codes laid out: ``memopt_func._codes`` (its names that users
reach, ``Quantized``, ``quantize``, ``dequantize``, ``round_float``, ``BLOCK``, ``POWER``, ...,
are importable from here).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from . import schema
from ._codes import (  # noqa: F401  (re-exported: storage's public names)
    BLOCK,
    CODE_DTYPE,
    FUSE_MIN,
    MIN_QUANTIZED,
    POWER,
    Quantized,
    dequantize,
    fits,
    load_codes,
    quantize,
    quantized_shape,
    quantizes,
    random_uniform,
    requantize_slots,
    round_float,
    store_codes,
    store_float,
    store_float_runs,
    write_into,
)

FLOAT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("stochastic", "nearest")

#: Each declared moment field's 8-bit code kind, by name, and each stored field's random stream
#: id: both stated once, in ``schema`` (``MOMENTS`` fills as the state types are declared).
MOMENTS = schema.MOMENTS
STREAM_ID = schema.STREAM_ID

def check_state_dtype(name: str, value: Any) -> torch.dtype | None:
    if value is None or value in FLOAT_STORAGE or value == torch.int8:
        return value
    raise ValueError(
        f"invalid {name}: {value!r} ({name} must be None, torch.float32, torch.bfloat16, torch.float16 or torch.int8)"
    )


def check_buffer_dtype(name: str, value: Any) -> torch.dtype | None:
    if value is None or value == torch.int8 or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ValueError(f"invalid {name}: {value!r} ({name} must be None, a floating torch.dtype or torch.int8)")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or the parameter's dtype, whichever is wider."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------- the state


class Storage:
    """A rule's storage settings, applied around its update: ``fresh`` lays a new state out in
    storage, ``decode`` gives the update its inputs at compute precision, ``encode`` stores what
    it returns (only the tensors stepped; the others are left exactly as they were)."""

    def __init__(self, state_dtype, buffer_dtype, rounding: str, param_rounding: str, seed: int) -> None:
        self.state_dtype = state_dtype
        self.buffer_int8 = buffer_dtype == torch.int8
        self.stochastic = rounding == "stochastic"
        self.param_stochastic = param_rounding == "stochastic"
        self.seed = seed

    @property
    def active(self) -> bool:
        return self.state_dtype is not None or self.buffer_int8 or self.param_stochastic

    @property
    def draws(self) -> bool:
        """Whether a step draws random bits (stochastic rounding of a narrowed value)."""
        return (self.stochastic and self.state_dtype is not None) or self.param_stochastic

    @property
    def quantizes(self) -> bool:
        """Whether any state is held in 8-bit codes (laid out per tensor, not flat)."""
        return self.state_dtype == torch.int8 or self.buffer_int8

    def compute(self, p: Tensor) -> torch.dtype:
        """The dtype a tensor's step computes in: its own unless storage is set, else at least float32."""
        return compute_dtype(p.dtype) if self.state_dtype is not None or self.param_stochastic else p.dtype

    def _stored(self, p: Tensor) -> Any:
        """How a moment of a tensor like p is stored: a float dtype, or "int8"."""
        if self.state_dtype == torch.int8:
            return "int8" if quantizes(p) else self.compute(p)
        return self.state_dtype or p.dtype

    # -- fresh state
    def fresh(self, state: NamedTuple, leaves: Sequence[Tensor]) -> NamedTuple:
        """A fresh (all-zero) state as stored."""
        if not self.active:
            return state
        return _map_fields(state, lambda name, f, i, v: self._fresh_entry(f, v, leaves[i]), _critical_sums(self, leaves))

    def _fresh_entry(self, f: schema.Field, v: Tensor, p: Tensor) -> Any:
        if f.role == schema.SLOTS:
            if not self.buffer_int8:
                return v
            if quantizes(p):
                codes, absmax = quantized_shape(v.shape, "signed", lead=1)
                return Quantized(
                    torch.zeros(codes, dtype=torch.int8, device=v.device), torch.zeros(absmax, device=v.device)
                )
            return v.to(p.dtype)  # too small to gain: slots as with buffer_dtype=None
        stored = self._stored(p)
        if stored == "int8":
            kind = f.kind
            codes, absmax = quantized_shape(v.shape, kind)
            return Quantized(
                torch.zeros(codes, dtype=CODE_DTYPE[kind], device=v.device), torch.zeros(absmax, device=v.device)
            )
        return v.to(stored)

    # -- a step
    def decode(self, params: list[Tensor], grads: list[Tensor], state: NamedTuple, idx: Sequence[int]):
        """The step's inputs at compute precision: (params, grads, state) of the present leaves."""
        dtypes = [self.compute(p) for p in params]
        params = [p if p.dtype == d else p.to(d) for p, d in zip(params, dtypes)]
        grads = [g if g.dtype == d else g.to(d) for g, d in zip(grads, dtypes)]
        where = dict(zip(idx, range(len(idx))))

        def entry(name: str, f: schema.Field, i: int, v: Any) -> Any:
            if i not in where:
                return v
            d = dtypes[where[i]]
            if isinstance(v, Quantized):
                shape = params[where[i]].shape
                if f.role == schema.SLOTS:
                    return load_codes(v, f.kind, (v.codes.shape[0], *shape), d, lead=1)
                return load_codes(v, f.kind, shape, d)
            if f.role == schema.SLOTS or v.dtype == d:
                return v
            return v.to(d)

        return params, grads, _map_fields(state, entry)

    def encode(self, new_params, new_state, params, state, idx, donate: bool, segments=None):
        """The stepped values stored: ``new_params``/``new_state`` at compute precision (present
        leaves / all leaves), ``params``/``state`` as stored before the step. ``segments`` (per
        present leaf, or None): a leaf laying several tensors end to end (a ``_tree.Runs`` with
        their positions) draws each element's rounding bits as its own tensor would."""
        step = new_state.step
        where = dict(zip(idx, range(len(idx))))
        segments = segments or [None] * len(idx)

        def narrowed(new: Tensor, dtype: torch.dtype, t: Tensor, name: str, j: int, stochastic: bool) -> Tensor:
            runs = segments[j]
            if runs is None or not stochastic:
                return store_float(new, dtype, self.seed, t, name, j, stochastic)
            if not hasattr(runs, "positions"):
                raise ValueError(
                    f"leaf {j} lays several tensors end to end (segments), and its state is rounded stochastically: "
                    "its segments must say the tensors' positions (memopt_func._tree.Runs)"
                )
            return store_float_runs(new, dtype, self.seed, t, name, runs, stochastic)

        def entry(name: str, f: schema.Field, i: int, new: Any, old: Any) -> Any:
            if i not in where:
                return old
            t = step[i]
            if isinstance(old, Quantized):
                if f.role == schema.SLOTS:
                    out = requantize_slots(old, new)
                else:
                    out = store_codes(new, f.kind, self.seed, t, name, where[i], self.stochastic)
                return write_into(old, out) if donate else out
            if f.role == schema.SLOTS or new.dtype == old.dtype:
                return new  # not narrowed: the update wrote it as the rule does (in place when donated)
            if f.role == schema.SLOT_SUM:  # an 8-bit buffer's sum, recomputed from its slots every step
                out = new.to(old.dtype)
            else:
                out = narrowed(new, old.dtype, t, name, where[i], self.stochastic)
            return old.copy_(out) if donate else out

        stored_state = _map_pairs(new_state, state, entry)
        out_params = []
        for j, i in enumerate(idx):
            new, old = new_params[j], params[j]
            if new.dtype != old.dtype:
                new = narrowed(new, old.dtype, step[i], "params", j, self.param_stochastic)
                if donate:
                    new = old.copy_(new)
            out_params.append(new)
        return out_params, stored_state


def _critical_sums(storage: Storage, leaves: Sequence[Tensor]):
    """buf_sum's stored dtype per leaf: an 8-bit buffer's sum is recomputed from its slots every
    step, and stored at compute precision; otherwise float64 as the buffer keeps it."""

    def fix(name: str, f: schema.Field, i: int, v: Tensor) -> Tensor:
        if f.role == schema.SLOT_SUM and storage.buffer_int8 and quantizes(leaves[i]):
            return v.to(compute_dtype(leaves[i].dtype))
        return v

    return fix


def _map_fields(state: Any, fn, after=None) -> Any:
    """The state with ``fn(field, declaration, leaf index, entry)`` applied to each per-leaf entry
    of the stored fields (moments and slots), and ``after`` to every per-leaf entry after that."""
    if state is None:
        return None
    fields = {}
    for name, f in schema.of(state).items():
        v = getattr(state, name)
        if f.role == schema.NESTED:
            v = _map_fields(v, fn, after)
        elif isinstance(v, tuple):
            if f.role in (schema.MOMENT, schema.SLOTS):
                v = tuple(fn(name, f, i, e) for i, e in enumerate(v))
            if after is not None:
                v = tuple(after(name, f, i, e) for i, e in enumerate(v))
        fields[name] = v
    return type(state)(**fields)


def _map_pairs(new: Any, old: Any, fn) -> Any:
    """``fn(field, declaration, leaf index, new entry, old entry)`` over the stored fields (and
    the slot sums)."""
    if new is None:
        return None
    fields = {}
    for name, f in schema.of(new).items():
        v, w = getattr(new, name), getattr(old, name)
        if f.role == schema.NESTED:
            v = _map_pairs(v, w, fn)
        elif isinstance(v, tuple) and f.role in (schema.MOMENT, schema.SLOTS, schema.SLOT_SUM):
            v = tuple(fn(name, f, i, a, b) for i, (a, b) in enumerate(zip(v, w)))
        fields[name] = v
    return type(new)(**fields)


def storage_of(rule: Any) -> Storage:
    h = rule.hyper
    return Storage(
        h.get("state_dtype"), h.get("buffer_dtype"), h.get("rounding", "stochastic"), h.get("param_rounding", "nearest"), h.get("seed", 0)
    )


__all__ = ["Quantized", "Storage", "quantize", "dequantize", "round_float", "MOMENTS", "STREAM_ID", "BLOCK", "POWER"]
