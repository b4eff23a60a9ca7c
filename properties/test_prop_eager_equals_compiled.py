"""SPEC.md invariant "Eager, compiled, and CUDA-graph stepping agree to float rounding".

Each compiled example compiles a fresh step, so its example count is a fifth of the profile's.
The flat layout a Stepper steps (tensors of one dtype end to end, runs of equal sizes reduced
as ``[count, numel]`` blocks for the priority) is checked on its own with ``compile=False``,
where examples are cheap. Both draw what makes a synced critical buffer decide: decays near 1,
gradient scales that grow and shrink, per-tensor scale patterns that change from step to step
(so a sum of norms and a norm of the sum rank steps differently), and trees with runs of
equal-sized tensors. The critical rules drawn include the buffer over AdEMAMix, AdamW and
RMSprop made by ``rules.with_critical_buffer`` (SPEC.md 8.3; "<Base>+buffer", as in
``strategies.COMBINED_RULES``). CUDA-graph replay is checked in tests/test_compiled.py where CUDA
exists.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import event, given, settings
from hypothesis import strategies as st

from harness import ADMISSIONS, full_buffer_choices, make_rule, sees_admissions_and_refusals
from memopt_func.compiled import Stepper
from memopt_func import rules
from strategies import COMBINED_BASE, CRITICAL_RULES, deciding_decays, flat, grad_streams, shape_lists, trees

# the package's critical rules and the combined ones (AdEMAMix+buffer, AdamW+buffer, RMSprop+buffer)
CRITICAL = list(CRITICAL_RULES)
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


@st.composite
def rule_configs(draw, *, critical_only: bool = False):
    # critical rules at least half the time: they are where the layouts can disagree
    every = st.sampled_from(sorted(rules.RULES))
    name = draw(st.sampled_from(CRITICAL) if critical_only else st.one_of(st.sampled_from(CRITICAL), every))
    hyper = {"lr": draw(st.sampled_from([1e-3, 1e-2]))}
    if name in CRITICAL:
        hyper.update(
            topC=draw(st.integers(1, 3)),
            decay=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), deciding_decays, deciding_decays)),
            synced=draw(st.sampled_from([True, True, False])),
            aggr=draw(st.sampled_from(["sum", "mean", "buffer"])),
            critical_test=draw(st.sampled_from([0.0, 0.0, 0.3])),
        )
    base = COMBINED_BASE.get(name, name)
    if base == "AdEMAMix":
        hyper.update(beta3_warmup=draw(st.sampled_from([None, 2, 4])), alpha_warmup=draw(st.sampled_from([None, 3])))
    if base in ("SGD", "SGD_C", "RMSprop", "RMSprop_C"):
        hyper["momentum"] = draw(st.sampled_from([0.0, 0.9]))
    return name, hyper


def _stream(draw, n_leaves: int, hyper: dict, extra: int):
    """Gradient steps for a Stepper (every tensor has a gradient): the buffer fills, then decides."""
    fill = hyper.get("topC", 0)
    return draw(
        grad_streams(
            n_leaves, min_steps=max(2, fill + 2), max_steps=fill + extra, allow_none=False,
            walk=draw(st.integers(0, 3)) != 0, leaf_scales=True,
        )
    )


def _note_decisions(name: str, before, after, rows: list[int]) -> tuple[int, int]:
    if name not in CRITICAL or before.critical is None:
        return 0, 0
    return full_buffer_choices(before.critical, after.critical, rows)


def _rows(hyper: dict, n_leaves: int) -> list[int]:
    return [0] if hyper.get("synced", True) else list(range(n_leaves))


@st.composite
def compiled_cases(draw):
    config = draw(rule_configs())
    shapes = draw(shape_lists(min_leaves=1, max_leaves=6, runs=True))
    return config, shapes, draw(st.integers(0, 2**16)), _stream(draw, len(shapes), config[1], extra=6)


class _Travel:
    """How far each eager tensor has moved over the run: the sum over steps of its largest
    element-wise update, ``sum_k max|p_k - p_{k-1}|``."""

    def __init__(self, start):
        self.last = [t.double() for t in start]
        self.sums = [torch.zeros((), dtype=torch.float64) for _ in start]

    def add(self, now):
        now = [t.double() for t in now]
        for i, (a, b) in enumerate(zip(now, self.last)):
            if a.numel():
                self.sums[i] = self.sums[i] + (a - b).abs().max()
        self.last = now


def _check_close(got, want, start, travel: _Travel, where: str) -> None:
    """Each tensor within ``TOL`` of its dtype, relative to its scale over the run,
    max(|p_0|, |p_k|, its travel): rounding errors are made at the scale of the values combined,
    the parameter's and each step's update's, so a parameter that has moved close to 0
    (cancellation) keeps the absolute error of its starting scale, and one whose updates are
    larger than itself (a small scalar leaf, a large lr) the error of those updates."""
    for i, (a, b, p0) in enumerate(zip(got, want, start)):
        if b.numel() == 0:
            continue
        scale = torch.maximum(b.double().abs().max(), p0.double().abs().max())
        scale = torch.maximum(scale, travel.sums[i]).clamp(min=1e-6)
        err = ((a.double() - b.double()).abs().max() / scale).item()
        assert err < TOL[b.dtype], f"{where}: tensor {i} {tuple(b.shape)} differs from eager by {err:.2e} (relative)"


def _check_same_decisions(got_state, want_state, where: str) -> None:
    got, want = got_state.critical, want_state.critical
    if want is None:
        return
    assert got.accepted.tolist() == want.accepted.tolist(), (
        f"{where}: admissions {got.accepted.tolist()} != eager {want.accepted.tolist()}"
    )
    assert got.count.tolist() == want.count.tolist(), f"{where}: count"
    rtol = 1e-12 if want.keys.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.keys, want.keys, rtol=rtol, atol=0, msg=f"{where}: keys")


@settings(max_examples=max(4, settings().max_examples // 5))
@given(case=compiled_cases())
def test_invariant_eager_equals_compiled(case):
    """Eager and compiled stepping agree to 1e-6 relative in float32, across buffer filling ->
    full and warmup -> steady, with the learning rate changing every step; a critical buffer
    takes the same decisions (admission counts, keys to rounding)."""
    (name, hyper), shapes, seed, stream = case
    rule = make_rule(name, hyper)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    eager_params, eager_state = [p.clone() for p in params], rule.init(params)
    torch._dynamo.reset()
    stepper = Stepper(rule, [p.clone() for p in params])
    admitted = refused = 0
    travel = _Travel(params)
    for k, plan in enumerate(stream):
        grads = plan.grads(params)
        lr = hyper["lr"] * (1 + 0.5 * k)
        stepper.step(grads, lr=lr)
        before = eager_state
        eager_params, eager_state = rule.step(eager_params, grads, eager_state, lr=lr)
        a, r = _note_decisions(name, before, eager_state, _rows(hyper, len(shapes)))
        admitted, refused = admitted + a, refused + r
        travel.add(eager_params)
        _check_close(stepper.params, eager_params, params, travel, f"step {k + 1}")
        if name in CRITICAL:
            _check_same_decisions(stepper.per_tensor_state(), eager_state, f"step {k + 1}")
    if name in CRITICAL:
        event(f"full buffer: {'admitted and refused' if admitted and refused else 'not both'}")


@st.composite
def flat_cases(draw):
    config = draw(rule_configs(critical_only=True))
    tree = draw(trees(min_leaves=2, max_leaves=7, low_precision=False, runs=True))
    return config, tree, _stream(draw, tree.n, config[1], extra=10)


@sees_admissions_and_refusals(0.12)
@given(case=flat_cases())
def test_invariant_eager_equals_flat_stepper(case):
    """The flat layout of the compiled path, without compiling: a ``Stepper(compile=False)``
    (float64/float32 tensors end to end per dtype, a synced priority over ``[count, numel]``
    runs) agrees with the eager rule on separate leaves: the same admissions, keys to rounding,
    parameters to 1e-6 (float32) / 1e-12 (float64) of their scale, per-step lr."""
    (name, hyper), tree, stream = case
    rule = make_rule(name, hyper)
    params = tree.build()
    start, spec = flat(params)
    eager_params, eager_state = params, rule.init(params)
    stepper = Stepper(rule, tree.build(), compile=False)
    admitted = refused = 0
    travel = _Travel(start)
    for k, plan in enumerate(stream):
        leaves = flat(eager_params)[0]
        grads = pytree.tree_unflatten(plan.grads(leaves), spec)
        lr = hyper["lr"] * (1 + 0.5 * k)
        stepper.step(grads, lr=lr)
        before = eager_state
        eager_params, eager_state = rule.step(eager_params, grads, eager_state, lr=lr)
        a, r = _note_decisions(name, before, eager_state, _rows(hyper, tree.n))
        admitted, refused = admitted + a, refused + r
        where = f"step {k + 1}"
        _check_same_decisions(stepper.per_tensor_state(), eager_state, where)
        travel.add(flat(eager_params)[0])
        _check_close(flat(stepper.params)[0], flat(eager_params)[0], start, travel, where)
    ADMISSIONS.note(admitted, refused)
