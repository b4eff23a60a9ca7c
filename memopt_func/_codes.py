"""How state is rounded and coded when it is stored narrower than the computation
(``memopt_func.storage`` decides where; this module does the rounding and the codes).

A value stored narrower than the computation is rounded stochastically (``rounding=
"stochastic"``, the default: up or down with probability proportional to the distance from the
other) or to the nearest representable value (``"nearest"``). The random bits come from the
counter-based hash of (``seed``, the element's index, the tensor's step, the state field, the
tensor's position among those stepped), so a run replays bit-for-bit, a resume is bit-identical,
and eager and compiled steps draw the same bits (a compiled stepper keeps such state per tensor). Critical slots are written once and never
accumulated into, so they are rounded to nearest, which halves the worst-case error.

8-bit codes: a tensor is cut into blocks of ``BLOCK`` consecutive elements (of the flattened
tensor, so a shard quantizes locally); each block keeps its absolute maximum in float32 and
each element a code ``q`` with value ``absmax * (q / L) ** POWER`` (a power code: fine steps
near zero, where values that span decades crowd). Signed state uses int8 (``L = 127``); state
that is never negative (second moments) uses uint8 (``L = 255``). The code's power and the
block size per kind were chosen by measured error (``bench/int8_codes.py``). Tensors with fewer
than ``MIN_QUANTIZED`` elements gain too little to be worth the error and stay at full precision.
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from .schema import STREAM_ID
from ._counter_hash import salt as _salt
from ._counter_hash import uniform_salted

#: Tensors smaller than this stay at full precision under 8-bit storage.
MIN_QUANTIZED = 4096
#: Elements per block, and the code's power, per kind (see ``bench/int8_codes.py``).
BLOCK = {"signed": 256, "square": 256}
POWER = {"signed": 2.0, "square": 4.0}
_LEVELS = {"signed": 127, "square": 255}
CODE_DTYPE = {"signed": torch.int8, "square": torch.uint8}
_KEEP_NONZERO = True  # bench/int8_codes.py turns it off to show what it prevents


class Quantized(NamedTuple):
    """A tensor in 8-bit block-wise storage: ``codes [*lead, blocks * BLOCK]`` (int8, or uint8
    for a never-negative kind) and ``absmax [*lead, blocks]`` float32; ``lead`` is ``()`` for a
    moment and ``(topC,)`` for a critical buffer (one set of blocks per slot)."""

    codes: Tensor
    absmax: Tensor


# ---------------------------------------------------------------- rounding


def _stream(step: Tensor, field: str, position: int | Tensor) -> Tensor:
    return (step.to(torch.int64) * 0x9E3779B1 + (position * 64 + STREAM_ID[field]) * 0x85EBCA77) & 0xFFFFFFFF


def _draw(x: Tensor, salt: Tensor | int, stream: Tensor) -> Tensor:
    """``uniform`` over x's elements, their index as the counter (see ``_counter_hash``)."""
    counter = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    return uniform_salted(salt, counter, stream)


def random_uniform(x: Tensor, seed: int, step: Tensor, field: str, position: int) -> Tensor:
    """u in [0, 1) per element of x: the hash of (seed, the element's index in its tensor, the
    tensor's step, the field, the tensor's position among the tensors stepped)."""
    return _draw(x, _salt(seed), _stream(step, field, position))


def round_float(x: Tensor, dtype: torch.dtype, u: Tensor | None) -> Tensor:
    """x (float32 or float64) in the narrower float dtype: stochastically with uniform u, or to
    nearest when u is None. Done on the bits of x (adding random low bits, then truncating), which
    is unbiased within each binade and compiles to the same numbers as eager."""
    if u is None or dtype == x.dtype:
        return x.to(dtype)
    if dtype == torch.float32:  # from float64: 29 of its 52 mantissa bits go
        b = x.view(torch.int64)
        r = (u * 2.0**29).to(torch.int64)
        y = ((b + r) & ~((1 << 29) - 1)).view(torch.float64)
        return torch.where(torch.isfinite(x), y, x).to(torch.float32)
    x = x.to(torch.float32)
    k = 16 if dtype == torch.bfloat16 else 13  # mantissa bits of float32 that dtype lacks
    r = (u * float(2**k)).to(torch.int32)
    y = ((x.view(torch.int32) + r) & ~((1 << k) - 1)).view(torch.float32)
    if dtype == torch.float16:  # below float16's normal range its grid is even: 2**-24 apart
        tiny = 2.0**-24
        sub = torch.floor(x.abs() / tiny + u.to(torch.float32)) * tiny
        y = torch.where(x.abs() < 2.0**-14, torch.copysign(sub, x), y)
    return torch.where(torch.isfinite(x), y, x).to(dtype)


# ---------------------------------------------------------------- 8-bit codes


def _power(x: Tensor, k: float) -> Tensor:
    """x ** k, by multiplication for the powers the codes use (pow costs a log and an exp)."""
    if k == 1:
        return x
    if k == 2:
        return x * x
    if k == 4:
        x2 = x * x
        return x2 * x2
    return x.pow(k)


def _root(x: Tensor, k: float) -> Tensor:
    """x ** (1 / k) for x >= 0."""
    if k == 1:
        return x
    if k == 2:
        return x.sqrt()
    if k == 4:
        return x.sqrt().sqrt()
    return x.pow(1.0 / k)


def _blocks(x: Tensor, block: int) -> Tensor:
    """x flattened per leading row and zero-padded to whole blocks: ``[*lead, blocks, block]``."""
    lead = x.shape[:-1]
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*lead, -1, block)


def quantize(x: Tensor, kind: str, u: Tensor | None, lead: int = 0) -> Quantized:
    """x (float32/64) in 8-bit block-wise codes; ``lead`` leading dims keep their own blocks.
    Stochastic between the two nearest codes with uniform u (same shape as x), else nearest."""
    block, power, levels = BLOCK[kind], POWER[kind], _LEVELS[kind]
    x = x.to(torch.float32)
    flat = x.reshape(*x.shape[:lead], -1)
    xb = _blocks(flat, block)
    absmax = xb.abs().amax(dim=-1)
    y = (xb.abs() / absmax.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).clamp(max=1.0)
    t = _root(y, power) * levels
    lo = t.floor().clamp(max=levels - 1)
    d_lo = _power(lo / levels, power)
    d_hi = _power((lo + 1) / levels, power)
    p = (y - d_lo) / (d_hi - d_lo)
    if u is None:
        up = p > 0.5
    else:
        up = _blocks(u.to(torch.float32).reshape(flat.shape), block) < p
    q = lo + up.to(lo.dtype)
    if kind == "square" and _KEEP_NONZERO:  # a non-zero second moment never becomes 0 (its step would divide by eps)
        q = torch.where(xb > 0, q.clamp(min=1), q)
    if kind == "signed":
        q = torch.where(xb < 0, -q, q)
    codes = q.to(CODE_DTYPE[kind]).reshape(*flat.shape[:-1], -1)
    return Quantized(codes, absmax)


def dequantize(q: Quantized, kind: str, shape: Sequence[int], dtype: torch.dtype, lead: int = 0) -> Tensor:
    """The values of 8-bit codes, in dtype, shaped ``shape`` (the leading dims included)."""
    block, power, levels = BLOCK[kind], POWER[kind], _LEVELS[kind]
    numel = 1
    for s in shape[lead:]:
        numel *= s
    c = q.codes.to(torch.float32)

    def values(codes: Tensor, absmax: Tensor) -> Tensor:
        mag = _power(codes.abs() / levels, power) * absmax[..., None]
        return torch.where(codes < 0, -mag, mag).reshape(*codes.shape[:-2], -1)

    whole = numel // block
    full = values(c[..., : whole * block].reshape(*c.shape[:-1], whole, block), q.absmax[..., :whole])
    if whole * block < numel:
        # the partial last block on its own: read through one flat loop over ``numel`` elements,
        # the block index ``i // 256`` makes Inductor's CPU loop split (torch 2.13) drop the
        # loop's last ``numel % 256`` iterations, which then read memory never written
        rest = c[..., whole * block : numel]
        full = torch.cat([full, values(rest[..., None, :], q.absmax[..., whole : whole + 1])], dim=-1)
    return full.reshape(shape).to(dtype)


def quantized_shape(shape: Sequence[int], kind: str, lead: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of (codes, absmax) for a tensor of ``shape``."""
    numel = 1
    for s in shape[lead:]:
        numel *= s
    blocks = -(-numel // BLOCK[kind])
    head = tuple(shape[:lead])
    return (*head, blocks * BLOCK[kind]), (*head, blocks)


def quantizes(p: Tensor) -> bool:
    """Whether 8-bit storage quantizes state of a tensor like p (large enough to gain)."""
    return p.numel() >= MIN_QUANTIZED


def fits(entry: Any, p: Tensor, lead: int) -> bool:
    """Whether a stored entry has the layout a tensor like p needs (``lead`` leading dims)."""
    if isinstance(entry, Quantized):
        kind = "square" if entry.codes.dtype == torch.uint8 else "signed"
        want_codes, want_absmax = quantized_shape((*entry.codes.shape[:lead], *p.shape), kind, lead)
        return tuple(entry.codes.shape) == want_codes and tuple(entry.absmax.shape) == want_absmax
    return isinstance(entry, Tensor) and tuple(entry.shape[lead:]) == tuple(p.shape)


# ---------------------------------------------------------------- fused kernels
#
# Stochastic rounding draws its bits from a hash of some twenty integer passes over the tensor;
# run op by op (an eager step) that costs more than the step itself. Outside a compiled region
# these kernels run through torch.compile (one fused pass each; shapes dynamic, so each kernel
# compiles once per dtype), and op by op where that cannot be: under a torch.func transform,
# when autograd records the step, or when no compiler works here.


def _k_round(x: Tensor, salt: Tensor, stream: Tensor, dtype: torch.dtype) -> Tensor:
    return round_float(x, dtype, _draw(x, salt, stream))


def _k_quantize(x: Tensor, salt: Tensor, stream: Tensor, kind: str) -> Quantized:
    return quantize(x, kind, _draw(x, salt, stream))


def _k_dequantize(codes: Tensor, absmax: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """The values of every code, padding included: ``[rows, blocks * BLOCK]``."""
    return dequantize(Quantized(codes, absmax), kind, codes.shape, dtype, lead=1)


#: Tensors with at least this many elements run their rounding through the fused kernels.
FUSE_MIN = 1 << 14
_COMPILED: dict[tuple, Any] = {}
_EAGER_ONLY: list[bool] = []  # set once a compile failed: every kernel then runs op by op


def _kernel(fn, key: tuple, *tensors: Tensor):
    """fn compiled once per key, or fn itself where compiling cannot or should not happen."""
    if _EAGER_ONLY or torch.compiler.is_compiling() or torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fn
    if tensors[0].numel() < FUSE_MIN:  # op by op costs little here, and a compile would cost more
        return fn
    if any(_wrapped(t) for t in tensors) or tensors[0].device.type == "meta":
        return fn
    compiled = _COMPILED.get(key)
    if compiled is None:
        # a private code object per key: Dynamo caches graphs per code object, and one shared by
        # every kind and dtype would reach its recompile limit
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_COMPILED)}")
        own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        compiled = _COMPILED[key] = torch.compile(own, dynamic=True, fullgraph=True)
    return compiled


def _wrapped(t: Tensor) -> bool:
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:
        return False


def _run(fn, key: tuple, *args):
    kernel = _kernel(fn, key, *(a for a in args if isinstance(a, Tensor)))
    if kernel is fn:
        return fn(*args)
    try:
        with torch.no_grad():  # storage is not differentiated (inputs that need grad run op by op)
            return kernel(*args)
    except Exception as e:  # noqa: BLE001 - no working compiler here: fall back for good
        if not _EAGER_ONLY:
            import warnings

            warnings.warn(
                f"memopt_func.storage: compiling the rounding kernels failed ({type(e).__name__}: {e}); "
                "they run op by op from now on (same numbers, slower eager steps)",
                RuntimeWarning,
                stacklevel=3,
            )
            _EAGER_ONLY.append(True)
        return fn(*args)


def store_float(x: Tensor, dtype: torch.dtype, seed: int, step: Tensor, field: str, position: int, stochastic: bool) -> Tensor:
    """x in the narrower float dtype: stochastically rounded with the hash's bits, or to nearest."""
    if not stochastic:
        return x.to(dtype)
    flat = x.reshape(-1)
    salt = torch.tensor(_salt(seed), dtype=torch.int64, device=x.device)
    out = _run(_k_round, ("round", x.dtype, dtype), flat, salt, _stream(step, field, position).to(x.device), dtype)
    return out.view(x.shape)


def _k_round_at(x: Tensor, salt: Tensor, counter: Tensor, stream: Tensor, dtype: torch.dtype) -> Tensor:
    return round_float(x, dtype, uniform_salted(salt, counter, stream))


_SALTS: dict[tuple, Tensor] = {}
#: A flat leaf's draws are made this many elements at a time, so that their int64 counters and
#: streams (16 bytes per element) stay a bounded temporary whatever the leaf's size.
RUN_CHUNK = 1 << 22


def _salt_on(seed: int, device: torch.device) -> Tensor:
    salt = _SALTS.get((seed, device))
    if salt is None:
        salt = _SALTS[(seed, device)] = torch.tensor(_salt(seed), dtype=torch.int64, device=device)
    return salt


def _run_chunks(runs: Any, device: torch.device) -> tuple[Tensor, list[tuple[int, int, int, int, Tensor, Tensor]]]:
    """(positions [T] on device, chunks): each chunk ``(a, b, k0, k1, base, sizes)`` covers
    elements ``[a, b)`` of the flat leaf, which hold pieces of tensors ``k0 .. k1 - 1``;
    ``sizes`` are the pieces' lengths and ``base`` each piece's first index in its tensor minus
    its offset in the chunk (int64 on device). Made once per layout and device, kept on runs."""
    cache = runs.__dict__.setdefault("_chunks", {})
    got = cache.get(device)
    if got is not None:
        return got
    sizes = runs.sizes()
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    total, chunks, k = starts[-1], [], 0
    for a in range(0, total, RUN_CHUNK):
        b = min(a + RUN_CHUNK, total)
        while starts[k + 1] <= a:
            k += 1
        k0, pieces, bases = k, [], []
        j = k
        while j < len(sizes) and starts[j] < b:
            lo, hi = max(starts[j], a), min(starts[j + 1], b)
            if hi > lo:
                pieces.append(hi - lo)
                bases.append((lo - starts[j]) - (lo - a))
            j += 1
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        chunks.append((a, b, k0, k0 + len(pieces), as_tensor(bases), as_tensor(pieces)))
    got = cache[device] = (torch.tensor(runs.positions, dtype=torch.int64, device=device), chunks)
    return got


def store_float_runs(x: Tensor, dtype: torch.dtype, seed: int, step: Tensor, field: str, runs: Any, stochastic: bool) -> Tensor:
    """``store_float`` of a flat leaf that lays several tensors end to end (``runs``, a
    ``_tree.Runs`` with their positions): each element draws the bits it would draw in its own
    tensor, from (seed, its index in that tensor, the step, the field, the tensor's position),
    so the flat leaf rounds exactly as the tensors stepped one by one. The draws go
    ``RUN_CHUNK`` elements at a time: a fixed number of launches per chunk, whatever the number
    of tensors."""
    if not stochastic:
        return x.to(dtype)
    flat = x.reshape(-1)
    positions, chunks = _run_chunks(runs, x.device)
    salt = _salt_on(seed, x.device)
    streams = _stream(step.to(x.device), field, positions)
    if len(chunks) == 1:
        out = _round_chunk(flat, salt, streams, chunks[0], dtype)
    else:
        out = torch.empty(flat.shape, dtype=dtype, device=x.device)
        for chunk in chunks:
            out[chunk[0] : chunk[1]] = _round_chunk(flat[chunk[0] : chunk[1]], salt, streams, chunk, dtype)
    return out.view(x.shape)


def _round_chunk(part: Tensor, salt: Tensor, streams: Tensor, chunk, dtype: torch.dtype) -> Tensor:
    a, b, k0, k1, base, sizes = chunk
    n = b - a
    counter = torch.arange(n, device=part.device, dtype=torch.int64) + base.repeat_interleave(sizes, output_size=n)
    stream = streams[k0:k1].repeat_interleave(sizes, output_size=n)
    return _run(_k_round_at, ("round-at", part.dtype, dtype), part, salt, counter, stream, dtype)


def store_codes(x: Tensor, kind: str, seed: int, step: Tensor, field: str, position: int, stochastic: bool) -> Quantized:
    """x in 8-bit codes (one tensor's blocks), rounded stochastically with the hash's bits or to nearest."""
    flat = x.reshape(-1)
    if not stochastic:
        return _run(quantize, ("quantize", x.dtype, kind), flat, kind, None)
    salt = torch.tensor(_salt(seed), dtype=torch.int64, device=x.device)
    return _run(_k_quantize, ("quantize-sr", x.dtype, kind), flat, salt, _stream(step, field, position).to(x.device), kind)


def load_codes(q: Quantized, kind: str, shape: Sequence[int], dtype: torch.dtype, lead: int = 0) -> Tensor:
    """``dequantize`` through a fused kernel (inside a compiled step: inline, at the exact shape)."""
    if torch.compiler.is_compiling():
        return dequantize(q, kind, shape, dtype, lead)
    head = tuple(shape[:lead])
    rows = 1
    for n in head:
        rows *= n
    numel = 1
    for n in shape[lead:]:
        numel *= n
    codes, absmax = q.codes.reshape(rows, -1), q.absmax.reshape(rows, -1)
    out = _run(_k_dequantize, ("dequantize", kind, dtype), codes, absmax, kind, dtype)
    return out[:, :numel].reshape(shape)


def write_into(old: Quantized, new: Quantized) -> Quantized:
    old.codes.copy_(new.codes)
    old.absmax.copy_(new.absmax)
    return old


def requantize_slots(old: Quantized, new: Tensor) -> Quantized:
    """A critical buffer's slots after a step: the blocks the step changed (the written slot)
    quantized afresh, to nearest; every other block keeps its codes bit for bit."""
    rows = new.reshape(new.shape[0], -1)
    out = _run(_k_requantize, ("requantize", new.dtype), rows, old.codes, old.absmax)
    return Quantized(out[0], out[1])


def _k_requantize(rows: Tensor, codes: Tensor, absmax: Tensor) -> tuple[Tensor, Tensor]:
    fresh = quantize(rows, "signed", None, lead=1)
    before = dequantize(Quantized(codes, absmax), "signed", rows.shape, rows.dtype, lead=1)
    changed = _blocks(rows != before, BLOCK["signed"]).any(dim=-1)
    blocks = (changed.shape[0], changed.shape[1], -1)
    kept = torch.where(changed[..., None], fresh.codes.view(blocks), codes.view(blocks)).reshape(codes.shape)
    return kept, torch.where(changed, fresh.absmax, absmax)
