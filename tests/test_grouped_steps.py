"""Grouped eager steps (``MemoryOptimizer._steps_grouped``): on an accelerator an eager drop-in
steps each param group as one flat group through uncompiled flat steppers, so a step launches a
fixed number of kernels whatever the tensor count (tests/test_launches.py counts them).

These tests run that path on CPU tensors (``optim.group_steps`` on, and ``slot_on_host`` off, as
an accelerator's tensors have it) and hold it to the per-tensor eager step on the CPU: the same
parameters and state, bit for bit, through fills, replacements, a ``critical_test`` draw, a
non-finite gradient, an lr change, a parameter without a gradient, and a resume.

Every tensor here has a multiple of 32 elements: ATen's CPU element-wise kernels compute the
vectorised body of a tensor and its scalar tail with different roundings (fused multiply-add or
not), so on a CPU an element's bits depend on where it sits in its tensor; with whole vectors
everywhere, a flat buffer and the separate tensors put every element in the body. (An
accelerator's kernels compute every element the same way.)"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from dropin_common import dropin, snapshot_state
from memopt_func import _slot_write
from memopt_func import optim as O
from test_dropin_nosync import SYNC_METHODS, HostSync


@contextlib.contextmanager
def grouped(sync_guard: bool = False):
    """Steps on CPU tensors take the accelerator's grouped path (host reads of the slots off)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(O, "group_steps", lambda device: True))
        stack.enter_context(mock.patch.object(_slot_write, "slot_on_host", lambda buf: False))
        if sync_guard:
            for method in SYNC_METHODS:

                def boom(self, *a, _m=method, **k):
                    raise HostSync(f"Tensor.{_m} called inside a grouped step (a host sync)")

                stack.enter_context(mock.patch.object(torch.Tensor, method, boom))
        yield


CONFIGS = [
    ("Adam_CM", dict(lr=1e-2, topC=3)),
    ("Adam_CM", dict(lr=1e-2, topC=3, amsgrad=True, weight_decay=0.1, critical_test=0.5)),
    ("Adam_C", dict(lr=1e-2, topC=3, critical_test=0.3, aggr="mean")),
    ("Adam_C", dict(lr=1e-2, topC=2, weight_decay=0.01, buffer_dtype=torch.float32)),
    ("Adam_C", dict(lr=1e-2, topC=2, buffer_dtype=torch.bfloat16, rounding="nearest")),
    ("RMSprop_C", dict(lr=1e-3, topC=3, momentum=0.5, centered=True, critical_test=0.2)),
    ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, dampening=0.1, weight_decay=0.01, critical_test=0.9)),
    ("SGD_C", dict(lr=1e-2, topC=3, aggr="buffer")),
    ("AdEMAMix_C", dict(lr=1e-2, topC=3, critical_test=0.3, beta3_warmup=5, alpha_warmup=4)),
    # stochastically rounded state: each element draws its own tensor's bits in the flat group
    ("Adam_CM", dict(lr=1e-2, topC=3, state_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)),
    ("Adam_C", dict(lr=1e-2, topC=2, state_dtype=torch.float16, seed=7)),
    ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, state_dtype=torch.bfloat16, critical_test=0.5)),
    ("AdEMAMix", dict(lr=1e-2, state_dtype=torch.bfloat16, beta3_warmup=5)),
]


def _id(cfg):
    name, kw = cfg
    return name + "-" + ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items())


def mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Linear(4, 32) -> Tanh -> Linear(32, 32): every tensor a multiple of 32 elements."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model.to(dtype)


def mse(model: torch.nn.Module, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 + k)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 32, generator=gen, dtype=torch.float64).to(dtype)
    return ((model(x) - y) ** 2).mean()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, a NaN (a non-finite gradient's) equal to a NaN in the same place."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _assert_same(ma, oa, mb, ob) -> None:
    for i, (a, b) in enumerate(zip(ma.parameters(), mb.parameters())):
        assert _same(a.detach(), b.detach()), f"param {i} differs by {(a - b).abs().nan_to_num(0.0).max().item():.3e}"
    sa, sb = snapshot_state(oa), snapshot_state(ob)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), f"state[{i}]: keys differ"
        for k in sa[i]:
            assert _same(sa[i][k], sb[i][k]), f"state[{i}][{k}] differs"


def _run(name, kwargs, dtype, steps, group, *, bad_at=None, skip_at=None, lr_at=None, before=None):
    """(model, opt) after ``steps`` eager steps, grouped or per tensor; ``before(k, params,
    opt)`` runs ahead of step k's backward."""
    model = mlp(dtype=dtype)
    params = list(model.parameters())
    opt = dropin(name)(params, **kwargs)
    for k in range(steps):
        if before is not None:
            before(k, params, opt)
        opt.zero_grad()
        mse(model, k).backward()
        if k == bad_at:
            params[1].grad[0] = float("inf")
        if k == skip_at:
            params[0].grad = None
        if k == lr_at:
            opt.param_groups[0]["lr"] = kwargs["lr"] / 3
        with grouped() if group else contextlib.nullcontext():
            opt.step()
        if group and k == 0:
            assert "_group_steps" in opt.__dict__, "the grouped path was not taken"
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_a_grouped_step_equals_the_per_tensor_step(cfg, dtype):
    name, kwargs = cfg
    runs = [_run(name, kwargs, dtype, 9, group, bad_at=8, lr_at=5) for group in (False, True)]
    (ma, oa), (mb, ob) = runs
    _assert_same(ma, oa, mb, ob)
    steppers = ob.__dict__["_group_steps"].steppers
    assert steppers and all(s.flat for s in steppers.values()), "the group did not step flat"


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix_C"])
def test_a_parameter_without_gradient_leaves_the_flat_layout_with_the_same_numbers(name):
    kwargs = dict(lr=1e-2, topC=3)
    (ma, oa), (mb, ob) = (_run(name, kwargs, torch.float32, 7, group, skip_at=3) for group in (False, True))
    _assert_same(ma, oa, mb, ob)


@pytest.mark.parametrize("name", ["Adam_CM", "SGD_C", "AdEMAMix_C"])
def test_a_grouped_step_reads_nothing_on_the_host(name):
    kwargs = dict(lr=1e-2, topC=2)
    model = mlp(dtype=torch.float32)
    opt = dropin(name)(model.parameters(), **kwargs)
    for k in range(5):
        opt.zero_grad()
        mse(model, k).backward()
        with grouped(sync_guard=k > 0):  # the first step lays the group out
            opt.step()


def test_a_resumed_grouped_run_continues_exactly():
    kwargs = dict(lr=1e-2, topC=3, critical_test=0.3)
    model_a, opt_a = _run("Adam_CM", kwargs, torch.float32, 8, group=False)
    model_b, opt_b = _run("Adam_CM", kwargs, torch.float32, 4, group=True)
    saved = opt_b.state_dict()
    fresh = mlp(dtype=torch.float32)
    fresh.load_state_dict(model_b.state_dict())
    opt_c = dropin("Adam_CM")(fresh.parameters(), **kwargs)
    opt_c.load_state_dict(saved)
    for k in range(4, 8):
        opt_c.zero_grad()
        mse(fresh, k).backward()
        with grouped():
            opt_c.step()
    _assert_same(model_a, opt_a, fresh, opt_c)


def test_a_parameter_given_new_storage_is_stepped_there():
    """``param.data = ...`` (what ``module.to`` does) after a grouped step: the next step lays
    the group out afresh over the new storage instead of stepping a stale flat copy."""
    model, opt = _run("Adam_CM", dict(lr=1e-2, topC=2), torch.float32, 2, group=True)
    p = next(model.parameters())
    p.data = p.data.clone()
    before = p.detach().clone()
    opt.zero_grad()
    mse(model, 2).backward()
    with grouped():
        opt.step()
    assert not torch.equal(p.detach(), before), "the re-pointed parameter was not stepped"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-2, topC=2, synced=False),
        dict(lr=1e-2, topC=2, state_dtype=torch.int8),
        dict(lr=1e-2, topC=2, buffer_dtype=torch.int8),
    ],
    ids=["unsynced", "int8-state", "int8-buffer"],
)
def test_state_that_is_not_laid_out_flat_steps_per_tensor(kwargs):
    model = mlp(dtype=torch.float32)
    opt = dropin("Adam_C")(model.parameters(), **kwargs)
    mse(model, 0).backward()
    with grouped():
        opt.step()
    assert "_group_steps" not in opt.__dict__


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix"])
def test_bf16_parameters_rounded_stochastically_step_as_per_tensor(name):
    kwargs = dict(lr=1e-2, param_rounding="stochastic", seed=3) | (dict(topC=2) if name == "Adam_CM" else {})
    (ma, oa), (mb, ob) = (_run(name, kwargs, torch.bfloat16, 6, group, lr_at=3) for group in (False, True))
    _assert_same(ma, oa, mb, ob)


@pytest.mark.parametrize(
    "name, kwargs",
    [("AdEMAMix", dict(lr=1e-2)), ("Adam_C", dict(lr=1e-2, topC=0)), ("SGD_C", dict(lr=1e-2, kappa=0.0))],
    ids=["AdEMAMix", "topC=0", "kappa=0"],
)
def test_a_rule_without_critical_buffer_steps_per_tensor(name, kwargs):
    """Its eager step is a fixed number of multi-tensor ops already: a flat group would only
    add a gradient copy."""
    model = mlp()
    opt = dropin(name)(model.parameters(), **kwargs)
    with grouped():
        assert not opt._steps_grouped()


def test_differentiable_and_cpu_steps_are_not_grouped():
    model = mlp(dtype=torch.float32)
    opt = dropin("Adam_CM")(model.parameters(), lr=1e-2, topC=2, differentiable=True)
    with grouped():
        assert not opt._steps_grouped()
    plain = dropin("Adam_CM")(model.parameters(), lr=1e-2, topC=2)
    with grouped():
        assert plain._steps_grouped()
    assert not plain._steps_grouped()  # on a CPU
    assert not O.group_steps(torch.device("cpu")) and O.group_steps(torch.device("meta"))


def _grouped_now(opt) -> bool:
    with grouped():
        return opt._steps_grouped()


def test_groups_that_would_not_give_the_per_tensor_numbers_step_per_tensor():
    """One flat buffer per group, every tensor's norm in the parameters' order: a group that
    mixes dtypes, holds an empty tensor, a frozen tensor with a gradient, or an FSDP1 flat
    parameter steps per tensor; so does ``foreach=False``."""
    def opt_over(params, **kw):
        return dropin("Adam_CM")(params, lr=1e-2, topC=2, **kw)

    a, b = torch.nn.Parameter(torch.randn(32)), torch.nn.Parameter(torch.randn(32))
    assert _grouped_now(opt_over([a, b]))
    assert not _grouped_now(opt_over([a, torch.nn.Parameter(torch.randn(32, dtype=torch.float64))]))
    assert not _grouped_now(opt_over([a, torch.nn.Parameter(torch.randn(0))]))
    assert not _grouped_now(opt_over([a, b], foreach=False))
    frozen = torch.nn.Parameter(torch.randn(32), requires_grad=False)
    assert _grouped_now(opt_over([a, frozen]))
    frozen.grad = torch.randn(32)
    assert not _grouped_now(opt_over([a, frozen]))
    flat_param = torch.nn.Parameter(torch.randn(32))
    flat_param._is_flat_param = True  # what torch.distributed.fsdp's FlatParameter carries
    assert not _grouped_now(opt_over([a, flat_param]))


def _both_ways(before) -> None:
    """Adam_CM stepped per tensor and grouped, with ``before`` between steps: the same bits."""
    (ma, oa), (mb, ob) = (_run("Adam_CM", dict(lr=1e-2, topC=2), torch.float32, 6, group, before=before) for group in (False, True))
    _assert_same(ma, oa, mb, ob)


def test_toggling_requires_grad_steps_as_per_tensor():
    def toggle(k, params, opt):
        for i, p in enumerate(params):
            p.requires_grad_(not (k in (2, 3) and i == k - 1))  # params[1] frozen at 2, params[2] at 3

    _both_ways(toggle)


def test_state_cleared_or_replaced_between_grouped_steps_is_taken_as_the_per_tensor_step_takes_it():
    def meddle(k, params, opt):
        if k == 2:
            opt.state.clear()
        if k == 3:  # a tensor replaced inside an entry
            opt.state[params[2]]["exp_avg_sq"] = torch.full_like(params[2], 0.5)
        if k == 4:  # an entry replaced
            entry = dict(opt.state[params[1]])
            entry["exp_avg"] = torch.zeros_like(params[1])
            opt.state[params[1]] = entry

    _both_ways(meddle)


def test_a_grouped_step_keeps_no_gradient_buffer_and_leaves_grad_alone():
    """The gradients are copied into a flat buffer of the step's own, freed after it: no second
    copy of the gradients lives between steps, and ``.grad`` is the tensor backward made."""
    model = mlp()
    opt = dropin("Adam_CM")(model.parameters(), lr=1e-2, topC=2)
    for k in range(2):
        opt.zero_grad()
        mse(model, k).backward()
        grads = [p.grad for p in model.parameters()]
        with grouped():
            opt.step()
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    stepper = opt.__dict__["_group_steps"].steppers[0]
    assert stepper.flat and stepper._grads is None


@pytest.mark.parametrize("chunk", [50, 1000])
def test_draws_made_a_chunk_at_a_time_are_the_per_tensor_draws(chunk):
    """A flat group's stochastic rounding goes ``RUN_CHUNK`` elements at a time; chunks that
    start and end inside tensors draw each element's own bits all the same."""
    from memopt_func import _codes

    kwargs = dict(lr=1e-2, topC=2, state_dtype=torch.bfloat16, seed=5)
    with mock.patch.object(_codes, "RUN_CHUNK", chunk):
        (ma, oa), (mb, ob) = (_run("Adam_CM", kwargs, torch.float32, 4, group) for group in (False, True))
    _assert_same(ma, oa, mb, ob)
    runs = ob.__dict__["_group_steps"].steppers[0]._segments[0]
    assert len(runs.__dict__["_chunks"][torch.device("cpu")][1]) > 1


def test_a_step_over_segmented_and_plain_leaves_flags_each_alike():
    """``Rule.step(segments=...)`` with one leaf laying tensors end to end and one plain leaf,
    eager, a tensor's gradient infinite: the same parameters and state as the three tensors
    stepped as leaves of their own (the plain leaf keeps one finiteness flag)."""
    from memopt_func import rules

    rule = rules.Adam_C(lr=1e-2, topC=2)
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=gen) for n in (32, 64, 32))
    ga, gb, gc = (torch.randn(t.shape, generator=gen) for t in (a, b, c))
    gb[3] = float("inf")
    alone = [a.clone(), b.clone(), c.clone()]
    state = rule.init(alone)
    joined = [torch.cat([a, b]), c.clone()]
    jstate = rule.init(joined)
    for _ in range(3):
        with mock.patch.object(_slot_write, "slot_on_host", lambda buf: False):
            alone, state = rule.step(alone, [ga, gb, gc], state)
            joined, jstate = rule.step(joined, [torch.cat([ga, gb]), gc], jstate, segments=[((1, 32), (1, 64)), None])
    assert _same(torch.cat(alone[:2]), joined[0]) and _same(alone[2], joined[1])
    assert torch.equal(state.critical.keys, jstate.critical.keys)
    assert _same(torch.cat([state.critical.buf_sum[0], state.critical.buf_sum[1]]), jstate.critical.buf_sum[0])
