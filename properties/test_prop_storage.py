"""SPEC.md "Storage precision" as properties:

* "Low-precision storage replays bit-for-bit for a seed; stochastic rounding is unbiased";
* 8-bit codes: every stored value is one of the two codes that bracket it (to nearest: the nearer
  one), so the error per element is bounded by its block's code spacing there;
* a save / ``torch.load(weights_only=True)`` / load resume is bit-identical for every storage setting;
* the reductions hold with the same storage on both sides (kappa=0 with int8 state is the base
  rule with int8 state), for the package's critical rules and for the buffer over AdEMAMix, AdamW
  and RMSprop made by ``rules.with_critical_buffer`` (SPEC.md 8.3, "<Base>+buffer");
* eager == compiled for every storage setting (few examples: each compiles a step).
"""

from __future__ import annotations

import io
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from memopt_func import optim, rules
from memopt_func import storage as S
from memopt_func.compiled import Stepper
from harness import make_rule
from strategies import COMBINED_BASE, grad_streams, shape_lists

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
DROPIN = ("Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix")
REDUCTIONS = {"Adam_CM": "AdamW", "Adam_C": "Adam", "RMSprop_C": "RMSprop", "SGD_C": "SGD", **COMBINED_BASE}


def _spanning(seed: int, n: int, decades: tuple[float, float], dtype=torch.float32, signed=True) -> torch.Tensor:
    """n values whose magnitudes are log-uniform over the decades, a few exact zeros among them."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = decades
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double() if signed else 1.0
    x = mag * sign
    x[torch.rand(n, generator=gen) < 0.02] = 0.0
    return x.to(dtype)


@st.composite
def storage_settings(draw, name: str):
    state_dtype = draw(st.sampled_from(STATE_DTYPES))
    hyper = {"state_dtype": state_dtype, "rounding": draw(st.sampled_from(S.ROUNDINGS)), "seed": draw(st.integers(0, 2**40))}
    if name in REDUCTIONS:
        hyper["buffer_dtype"] = draw(st.sampled_from([None, torch.bfloat16, torch.int8]))
        hyper["topC"] = draw(st.integers(1, 3))
        hyper["decay"] = draw(st.sampled_from([0.5, 0.9]))
    if name in ("SGD_C", "RMSprop_C", "SGD", "RMSprop", "RMSprop+buffer"):
        hyper["momentum"] = draw(st.sampled_from([0.0, 0.9]))
    if name in ("SGD_C", "SGD"):
        hyper["lr"] = 1e-2
    return hyper


def _sizes(draw):
    """Shapes with at least one tensor large enough to be quantized, and one that stays full."""
    big = draw(st.sampled_from([(64, 80), (S.MIN_QUANTIZED + 37,), (3, 40, 50)]))
    return [big, *draw(shape_lists(min_leaves=1, max_leaves=2))]


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 3000),
    kind=st.sampled_from(["signed", "square"]),
    decades=st.sampled_from([(-8.0, 4.0), (-3.0, 0.0), (0.0, 0.5)]),
    stochastic=st.booleans(),
)
def test_invariant_int8_codes_bracket_each_value(seed, n, kind, decades, stochastic):
    """Each dequantized value is one of the two codes around the value (the nearer one when
    rounding to nearest), with the sign kept; a block's largest value is stored exactly."""
    x = _spanning(seed, n, decades, signed=kind == "signed")
    u = S.random_uniform(x, seed, torch.tensor(3.0, dtype=torch.float64), "exp_avg", 0) if stochastic else None
    q = S.quantize(x, kind, u)
    got = S.dequantize(q, kind, x.shape, torch.float32)
    block, power, levels = S.BLOCK[kind], S.POWER[kind], {"signed": 127, "square": 255}[kind]
    absmax = q.absmax.repeat_interleave(block)[:n].double()
    y = (x.double().abs() / absmax.clamp(min=1e-300)).clamp(max=1.0)
    t = y.pow(1 / power) * levels
    lo = t.floor().clamp(max=levels - 1)
    below, above = (lo / levels).pow(power) * absmax, ((lo + 1) / levels).pow(power) * absmax
    mag = got.double().abs()
    slack = 1e-6 * absmax + 1e-30
    assert bool(((mag >= below - slack) & (mag <= above + slack)).all()), "a value left its bracketing codes"
    if kind == "square":
        assert bool(((got > 0) | (x == 0)).all()), "a non-zero second moment was stored as 0"
    assert bool(((got.sign() == x.sign()) | (got == 0)).all())
    if not stochastic and kind == "signed":
        nearer = torch.minimum((x.double().abs() - below).abs(), (above - x.double().abs()).abs())
        assert bool(((mag - x.double().abs()).abs() <= nearer + slack).all())
    for b in range(q.absmax.numel()):
        part = x[b * block : (b + 1) * block]
        if part.numel() and part.abs().max() > 0:
            j = part.abs().argmax()
            assert math.isclose(got[b * block + j].abs().item(), part.abs().max().item(), rel_tol=1e-6)


@given(
    seed=st.integers(0, 2**40),
    target=st.sampled_from(["bfloat16", "float16", "float32", "int8"]),
    value_seed=st.integers(0, 2**31 - 1),
)
def test_invariant_stochastic_rounding_is_unbiased_and_replays(seed, target, value_seed):
    """Over many steps' draws the mean of the stored values is the value (within 6 standard
    errors of the spacing); the same seed and step give the same bits, another step other bits."""
    n_draws = 2000
    source = torch.float64 if target == "float32" else torch.float32
    x = _spanning(value_seed, 16, (-6.0, 3.0), dtype=source)
    if target == "int8":
        x = torch.cat([x, x.abs().max().reshape(1)])  # the block's scale stays that of x

        def rounded(u):
            return S.dequantize(S.quantize(x, "signed", u), "signed", x.shape, torch.float64)

        nearest = rounded(None)
    else:
        dtype = getattr(torch, target)

        def rounded(u):
            return S.round_float(x, dtype, u).to(torch.float64)

        nearest = x.to(dtype).to(torch.float64)

    def store(step):
        return rounded(S.random_uniform(x, seed, torch.tensor(float(step), dtype=torch.float64), "exp_avg", 0))

    draws = torch.stack([store(k) for k in range(1, n_draws + 1)])
    assert torch.equal(draws[0], store(1)), "a draw does not replay"
    # the two values x may be stored as: its neighbours below and above (u -> 0 and u -> 1)
    spacing = (rounded(torch.full_like(x, 1 - 2**-30, dtype=torch.float64)) - rounded(torch.zeros_like(x, dtype=torch.float64))).abs()
    err = (draws.mean(0) - x.double()).abs()
    bound = 6 * (spacing / 2) / math.sqrt(n_draws) + 1e-300
    assert bool((err <= bound).all()), f"biased: error {err.max().item():.3g} over bound {bound[err.argmax()].item():.3g}"
    # the values are rounded, not kept: each draw is one of the two neighbours nearest rounding picks from
    assert bool(((draws == nearest) | (draws != x.double())).all())


def _model(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _step(opt, params, plan, start):
    for p, g in zip(params, plan.grads(start)):
        p.grad = None if g is None else g.clone()
    opt.step()


@given(name=st.sampled_from(DROPIN), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_invariant_storage_resume_is_bit_identical(name, data, seed):
    """Saving mid-run (``torch.save`` then ``torch.load(weights_only=True)``) and loading into a
    fresh optimizer continues bit for bit, for every storage setting, gaps in the gradients included."""
    hyper = data.draw(storage_settings(name))
    shapes = _sizes(data.draw)
    stream = data.draw(grad_streams(len(shapes), min_steps=2, max_steps=6))
    cut = data.draw(st.integers(1, len(stream) - 1))
    start = [p.detach().clone() for p in _model(shapes, seed)]
    ours = _model(shapes, seed)
    opt = getattr(optim, name)(ours, **hyper)
    for plan in stream[:cut]:
        _step(opt, ours, plan, start)
    blob = io.BytesIO()
    torch.save(opt.state_dict(), blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    resumed = [nn.Parameter(p.detach().clone()) for p in ours]
    opt2 = getattr(optim, name)(resumed, **hyper)
    opt2.load_state_dict(saved)
    for plan in stream[cut:]:
        _step(opt, ours, plan, start)
        _step(opt2, resumed, plan, start)
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)
    for p, q in zip(ours, resumed):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@given(name=st.sampled_from(sorted(REDUCTIONS)), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_invariant_reductions_hold_with_the_same_storage(name, data, seed):
    """Invariant "the reductions hold with the same storage on both sides": kappa=0 with
    low-precision state is the base rule with the same state storage, bit for bit (the package's
    critical rules and "<Base>+buffer", SPEC 8.3)."""
    hyper = data.draw(storage_settings(name))
    shapes = _sizes(data.draw)
    stream = data.draw(grad_streams(len(shapes), min_steps=1, max_steps=5))
    ours = make_rule(name, {"kappa": 0.0, **hyper})
    base = rules.RULES[REDUCTIONS[name]]
    theirs = base(**{h.name: ours.hyper[h.name] for h in base.HYPERS if h.name in ours.hyper})
    start = [p.detach() for p in _model(shapes, seed)]
    a, sa = list(start), ours.init(start)
    b, sb = list(start), theirs.init(start)
    for plan in stream:
        grads = plan.grads(start)
        a, sa = ours.step(a, grads, sa)
        b, sb = theirs.step(b, grads, sb)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@settings(max_examples=max(3, settings().max_examples // 6))
@given(name=st.sampled_from(["Adam_CM", "AdEMAMix", "SGD_C", "AdamW"]), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_invariant_storage_eager_equals_compiled(name, data, seed):
    """A compiled Stepper and the eager rule agree for every storage setting: the random bits are
    the same, so values differ only where float rounding moves a value across a rounding
    threshold (about 2**-16 of the elements per step for bfloat16), by one step of the storage."""
    hyper = data.draw(storage_settings(name))
    shapes = _sizes(data.draw)
    stream = data.draw(grad_streams(len(shapes), min_steps=2, max_steps=5, allow_none=False))
    rule = rules.RULES[name](**hyper)
    start = [p.detach() for p in _model(shapes, seed)]
    stepper = Stepper(rule, [p.clone() for p in start])
    assert not stepper.flat or not (rule._storage.quantizes or rule._storage.draws)
    ref, state = list(start), rule.init(start)
    for plan in stream:
        grads = plan.grads(start)
        ref, state = rule.step(ref, grads, state)
        stepper.step([g.clone() for g in grads])
    for x, y in zip(stepper.params, ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * (1 + (y.abs().max().item() if y.numel() else 0)))
