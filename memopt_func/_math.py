"""Element-wise building blocks over lists of tensors (multi-tensor ``_foreach``).

Scalars may be Python floats, 0-d tensors, or lists with one 0-d tensor per list entry.
``inplace=True`` writes the result into the first list (a donated state) with the same
arithmetic, so donated and pure steps give bit-identical numbers.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]
TensorList = Sequence[Tensor]

# The step's way of running the element-wise work (set by ``Rule.run`` for one step): multi-tensor
# ``_foreach`` kernels, or one op per tensor, out of place. The per-tensor form is what
# ``torch.func.vmap`` batches (``_foreach`` ops have no batching rules) and what autograd
# differentiates (no temporary is overwritten after an op saved it for its backward).
_state: dict = {"per_tensor": False, "scratch": None}


class _Setting:
    """``with`` it, one entry of the step's settings takes a value, restored on exit."""

    key = ""

    def __init__(self, value) -> None:
        self.value = value

    def __enter__(self) -> None:
        self.before = _state[self.key]
        _state[self.key] = self.value

    def __exit__(self, *exc) -> None:
        _state[self.key] = self.before


class per_tensor_ops(_Setting):
    """``with per_tensor_ops(True):`` the ops below run per tensor, out of place."""

    key = "per_tensor"


def is_per_tensor() -> bool:
    return _state["per_tensor"]


class using_scratch(_Setting):
    """``with using_scratch(s):`` the element-wise temporaries of large tensors come from the
    ``_scratch.Scratch`` s (None: allocated as usual). Eager multi-tensor steps only."""

    key = "scratch"


def power(base: Scalar, exponent: Tensor) -> Tensor:
    """``base ** exponent`` over a small vector of per-leaf scalars, each element's value
    independent of where it sits.

    On a CPU, ATen evaluates the vectorised body of ``pow`` with SLEEF and the tail with libm;
    they differ in the last bit for about 1.5% of ``0.999**t``. So the same leaf's bias correction
    would depend on how many leaves a step has, or on a ``vmap`` batch. Each tensor argument gets
    a trailing size-2 dimension of stride 0, which ATen runs element by element: every element
    takes libm's value, which is also what Python's ``**`` and ``torch.optim`` compute. Elsewhere
    (a GPU, ``meta``, a CPU scalar beside a device tensor, under ``torch.compile``) it is
    ``torch.pow`` as it is. (``log`` needs none of this: ATen computes every element of it with
    the same vectorised library.)"""
    args = (base, exponent)
    tensors = [a for a in args if isinstance(a, Tensor)]
    if any(t.device.type != "cpu" for t in tensors) or torch.compiler.is_compiling():
        return torch.pow(base, exponent)
    shape = torch.broadcast_shapes(*(a.shape for a in tensors))
    widened = [a.expand(shape).unsqueeze(-1).expand(*shape, 2) if isinstance(a, Tensor) else a for a in args]
    return torch.pow(*widened)[..., 0]


# out-of-place ops whose result fe may write into a scratch tensor of x's dtype (``out=``)
_INTO = {"sqrt", "mul", "div", "add", "lerp", "maximum", "neg", "addcmul", "addcdiv"}


def _into_scratch(name: str, xs: TensorList, args: tuple, kwargs: dict) -> list[Tensor] | None:
    """``fe(name, ...)`` with the results of the large tensors written into scratch tensors
    (tensor by tensor, ``out=``) and the small ones by the multi-tensor op as usual; None where
    that does not apply: no scratch, no large tensor, an in-place name, or an operand that
    would promote the result past x's dtype. The same kernels as the multi-tensor op (on a CPU
    it runs them tensor by tensor), so the same numbers."""
    scratch = _state["scratch"]
    if scratch is None or name not in _INTO or len(args) > 2:
        return None
    large = [i for i, x in enumerate(xs) if x.numel() >= scratch.min_numel]
    if not large:
        return None
    pick = lambda v, i: v[i] if isinstance(v, (list, tuple)) else v  # noqa: E731
    for i in large:
        for v in args:
            v = pick(v, i)
            if isinstance(v, Tensor) and (v.dim() and v.dtype != xs[i].dtype or v.dim() == 0 and not v.is_floating_point()):
                return None
    op = getattr(torch, name)
    out: list = [None] * len(xs)
    for i in large:
        out[i] = op(xs[i], *(pick(v, i) for v in args), **kwargs, out=scratch.like(xs[i]))
    small = [i for i in range(len(xs)) if out[i] is None]
    if small:
        sub = [[v[i] for i in small] if isinstance(v, (list, tuple)) else v for v in args]
        for i, r in zip(small, getattr(torch, f"_foreach_{name}")([xs[i] for i in small], *sub, **kwargs)):
            out[i] = r
    return out


def _at(v, i: int, x: Tensor):
    """Entry i of a per-tensor argument; a 0-d tensor is cast to x's dtype, as the multi-tensor
    kernels (and TensorIterator, for a 0-d operand) use it, whatever vmap's batching makes of it."""
    v = v[i] if isinstance(v, (list, tuple)) else v
    if isinstance(v, Tensor) and v.dim() == 0 and v.dtype != x.dtype and x.is_floating_point():
        return v.to(x.dtype)
    return v


_SINGLE = {
    "neg": lambda x: torch.neg(x),
    "sqrt": lambda x: torch.sqrt(x),
    "norm": lambda x, ord=2, dtype=None: torch.linalg.vector_norm(x, ord, dtype=dtype),
    "mul": lambda x, a: torch.mul(x, a),
    "div": lambda x, a: torch.div(x, a),
    "add": lambda x, a, alpha=1: torch.add(x, a, alpha=alpha),
    "maximum": lambda x, a: torch.maximum(x, a),
    "lerp": lambda x, y, w: torch.lerp(x, y, w),
    "addcmul": lambda x, t1, t2, value=1: torch.addcmul(x, t1, t2, value=value) if not isinstance(value, Tensor) else x + t1 * t2 * value,
    "addcdiv": lambda x, t1, t2, value=1: torch.addcdiv(x, t1, t2, value=value) if not isinstance(value, Tensor) else x + t1 / t2 * value,
    "copy": lambda x, y: y.to(x.dtype).expand_as(x).clone(),
}


def fe(name: str, xs: TensorList, *args, **kwargs) -> list[Tensor]:
    """``torch._foreach_<name>(xs, *args)``: for a name ending in ``_`` it writes xs and returns
    them. In per-tensor mode each tensor gets its own out-of-place op, and the results are
    returned whatever the name (lists among the arguments are taken entry by entry; a list of
    0-d tensors as addcmul's/addcdiv's third argument is the per-tensor ``value``)."""
    if not xs:
        return []
    if not _state["per_tensor"]:
        if _state["scratch"] is not None:
            into = _into_scratch(name, xs, args, kwargs)
            if into is not None:
                return into
        out = getattr(torch, f"_foreach_{name}")(xs, *args, **kwargs)
        return list(xs) if name.endswith("_") else list(out)
    op = _SINGLE[name.rstrip("_")]
    if name.rstrip("_") in ("addcmul", "addcdiv") and len(args) == 3:
        args, kwargs = args[:2], {**kwargs, "value": args[2]}
    return [
        op(x, *(_at(a, i, x) for a in args), **{k: _at(v, i, x) for k, v in kwargs.items()}) for i, x in enumerate(xs)
    ]


def finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for a floating-point x, in two element-wise ops instead of four:
    ``x - x`` is 0 exactly where x is finite and NaN where it is infinite or NaN."""
    return (x - x) == 0


def per_leaf(vec: Tensor, like: TensorList | None = None, operand: bool = False) -> list[Tensor]:
    """A 1-D tensor of per-leaf scalars as a list of 0-d tensors, for ``_foreach`` ops.

    A 0-d scalar would promote a 0-d leaf of a lower dtype (0-d with 0-d promotes by dtype), so
    for the 0-d leaves of ``like`` the scalar is cast to the leaf's dtype first. ``operand``
    says the scalars go straight into element-wise ops with float32 ``like`` tensors, which cast
    each one to float32 before computing: an eager step casts the vector once instead."""
    if operand and like and vec.dtype == torch.float64 and not torch.compiler.is_compiling():
        if all(x.dtype == torch.float32 for x in like):
            vec = vec.to(torch.float32)
    if vec.is_floating_point() and torch.compiler.is_compiling():
        # Identity (a running sum over one element), but a scan is a fusion barrier: without it
        # torch.compile inlines the scalar math that made vec (pow, sqrt, division of the step
        # counters) into every iteration of the element-wise loops that use it.
        vec = torch.cumsum(vec.unsqueeze(0), dim=0).squeeze(0)
    scalars = list(vec.unbind(0))
    if like is not None:
        scalars = [s.to(x.dtype) if x.dim() == 0 and x.dtype != s.dtype else s for s, x in zip(scalars, like)]
    return scalars


def _fit(xs: TensorList, a: Scalar | TensorList) -> Scalar | TensorList:
    """A 0-d tensor scalar as it may meet each x: cast to the dtype of 0-d xs, which it would
    otherwise promote (0-d with 0-d promotes by dtype; a per-step hyperparameter is float64)."""
    if isinstance(a, Tensor) and any(x.dim() == 0 and x.dtype != a.dtype for x in xs):
        return [a.to(x.dtype) if x.dim() == 0 else a for x in xs]
    if isinstance(a, list) and any(isinstance(v, Tensor) for v in a):
        return [v.to(x.dtype) if isinstance(v, Tensor) and x.dim() == 0 else v for v, x in zip(a, xs)]
    return a


def scale(xs: TensorList, a: Scalar | TensorList, inplace: bool = False) -> list[Tensor]:
    """a * x."""
    if inplace:
        if isinstance(a, (int, float)) and any(x.dtype in (torch.float16, torch.bfloat16) for x in xs):
            # _foreach_mul_ rounds a Python scalar to half precision first, unlike _foreach_mul
            # and Tensor.mul_; keep donated and pure steps bit-identical.
            return [x * a if _state["per_tensor"] else x.mul_(a) for x in xs]
        return fe("mul_", xs, _fit(xs, a))
    return fe("mul", xs, _fit(xs, a))


def add(xs: TensorList, ys: TensorList, inplace: bool = False) -> list[Tensor]:
    """x + y."""
    return fe("add_" if inplace else "add", xs, ys)


def add_scalar_(xs: list[Tensor], a: Scalar) -> list[Tensor]:
    """x + a written into xs (fresh temporaries). Under torch.compile a tensor a goes in as one
    0-d tensor per x: ``_foreach_add_(xs, a)`` with an ``a`` made in the graph (a lifted per-step
    value, see ``_rule._lifted``) reads ``a``'s value while Dynamo traces it on a CPU, a graph break."""
    if isinstance(a, Tensor) and torch.compiler.is_compiling():
        a = [a] * len(xs)
    return fe("add_", xs, _fit(xs, a))


def axpy(ys: TensorList, a: Scalar | TensorList, xs: TensorList, inplace: bool = False) -> list[Tensor]:
    """y + a * x (``add(alpha=a)`` for a number, as torch.optim writes it)."""
    if isinstance(a, (int, float)):
        return fe("add_" if inplace else "add", ys, xs, alpha=a)
    scales = _fit(xs, a if isinstance(a, list) else [a] * len(xs))
    return fe("addcmul_" if inplace else "addcmul", ys, xs, scales)


def addcdiv(ys: TensorList, num: TensorList, den: list[Tensor], a: Scalar | TensorList, inplace: bool = False) -> list[Tensor]:
    """y + a * num / den, as ``addcdiv(value=a)`` for a number; a tensor a (or one per leaf) goes
    into den instead (``y + num / (den / a)``), so den must be a fresh temporary."""
    if isinstance(a, (int, float)):
        value = a
    else:
        den = fe("div_", den, _fit(den, a if isinstance(a, list) else [a] * len(den)))
        value = 1
    return fe("addcdiv_" if inplace else "addcdiv", ys, num, den, value=value)


def ema(ms: TensorList, xs: TensorList, beta: Scalar, inplace: bool = False) -> list[Tensor]:
    """beta * m + (1 - beta) * x, as torch.optim computes it (a lerp towards x)."""
    return fe("lerp_" if inplace else "lerp", ms, xs, 1 - beta)


def vector(value: Scalar, like: Tensor) -> Tensor:
    """A float64 vector of like's shape and device holding value (a number or a 0-d tensor)."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float64).expand(like.shape)
    return torch.full(like.shape, value, dtype=torch.float64, device=like.device)


def ema_sq(vs: TensorList, xs: TensorList, beta: Scalar, inplace: bool = False) -> list[Tensor]:
    """beta * v + (1 - beta) * x * x, as torch.optim computes it (``v * beta``, then ``addcmul``)."""
    if isinstance(beta, Tensor):  # addcmul's weight must be a number
        return add(scale(vs, beta, inplace), scale(fe("mul", xs, xs), 1 - beta), inplace)
    out = scale(vs, beta, inplace)  # the state itself, or a fresh tensor: either may be written
    return fe("addcmul_", out, xs, xs, value=1 - beta)


def ema_mul_add(ms: TensorList, xs: TensorList, beta: Scalar | TensorList, inplace: bool = False) -> list[Tensor]:
    """beta * m + (1 - beta) * x written as the AdEMAMix reference does, ``m.mul_(beta).add_(x,
    alpha=1 - beta)`` (beta may be per leaf)."""
    one_minus = [(1 - b).to(b.dtype) for b in beta] if isinstance(beta, list) else 1 - beta
    return axpy(scale(ms, beta, inplace), one_minus, xs, inplace=True)  # the state, or fresh


def decoupled_decay(params: TensorList, lr: Scalar, weight_decay: Scalar, inplace: bool = False) -> list[Tensor]:
    """p * (1 - lr * weight_decay), the AdamW decay."""
    return scale(params, 1 - lr * weight_decay, inplace)


def adam_denominator(vs: TensorList, b2: Scalar, t: Tensor, eps: Scalar) -> list[Tensor]:
    """sqrt(v) / sqrt(1 - b2**t) + eps, one bias correction per leaf (t is the leaves' step vector)."""
    bc2_sqrt = torch.sqrt(1 - power(b2, t))
    d = fe("sqrt", vs)  # fresh: the rest works in place on it
    d = fe("div_", d, per_leaf(bc2_sqrt, vs, operand=True))
    return add_scalar_(d, eps)


def adam_apply(
    params: TensorList, num: TensorList, denom: list[Tensor], lr: Scalar, b1: Scalar, t: Tensor, inplace: bool = False
) -> list[Tensor]:
    """p - (lr / (1 - b1**t)) * num / denom, with one step size per leaf (a device tensor, so it
    goes into ``denom``, a fresh temporary of ``adam_denominator``)."""
    return addcdiv(params, num, denom, per_leaf(-(lr / (1 - power(b1, t))), num, operand=True), inplace)


def amsgrad_max(vmax: TensorList, vs: TensorList, inplace: bool = False) -> list[Tensor]:
    """max(vmax, v)."""
    return fe("maximum_" if inplace else "maximum", vmax, vs)


def scratch_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized temporary of x's shape (and dtype unless given) that dies within the
    step: from the step's ``Scratch`` when one is active, else freshly allocated."""
    scratch = _state["scratch"]
    if scratch is not None:
        return scratch.like(x, dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def scratch_list(xs: TensorList, dtype: torch.dtype) -> list[Tensor]:
    """``[scratch_like(x, dtype) for x in xs]`` carved from one block: the step's ``Scratch``
    when one is active and the block is large (a fresh large block would be faulted in every
    step), else one allocation."""
    if len(xs) < 2:
        return [scratch_like(x, dtype) for x in xs]
    numels = [x.numel() for x in xs]
    total = sum(numels)
    scratch = _state["scratch"]
    if scratch is not None and total >= scratch.min_numel:
        block = scratch.empty((total,), dtype, xs[0].device)
    else:
        block = torch.empty(total, dtype=dtype, device=xs[0].device)
    return [_shaped(t, x) for t, x in zip(block.split(numels), xs)]


def _shaped(t: Tensor, x: Tensor) -> Tensor:
    return t if x.dim() == 1 else t.view(x.shape)


def zeros_like(leaves: TensorList, dtype: torch.dtype | None = None) -> tuple[Tensor, ...]:
    return tuple(torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for p in leaves)


def zero_where(cond: Tensor, x: Tensor) -> Tensor:
    """x with 0 where cond holds (written into x, a fresh temporary, unless stepping per tensor)."""
    return x.masked_fill(cond, 0.0) if _state["per_tensor"] else x.masked_fill_(cond, 0.0)


def is_zero(x: Scalar) -> bool:
    """True for a Python zero; a tensor is never assumed zero (reading it would sync)."""
    return not isinstance(x, Tensor) and x == 0


def where(conds: TensorList, xs: TensorList, ys: TensorList, inplace: bool = False) -> list[Tensor]:
    """Per leaf: x where its 0-d condition holds, else y (written into y when inplace)."""
    if inplace and not _state["per_tensor"]:
        return [torch.where(c, x, y, out=y) for c, x, y in zip(conds, xs, ys)]
    if _state["scratch"] is not None and not _state["per_tensor"]:
        return [
            torch.where(c, x, y, out=scratch_like(x)) if x.dtype == y.dtype and x.shape == y.shape else torch.where(c, x, y)
            for c, x, y in zip(conds, xs, ys)
        ]
    return [torch.where(c, x, y) for c, x, y in zip(conds, xs, ys)]
