"""No host synchronisation inside step() on an accelerator: after the first step, opt.step()
must never read a tensor's value on the host. On CPU we make every such read raise
(Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__) while stepping.

On a CPU, where reading a value costs nothing, the critical buffer reads its slot index and an
eager step's admission flag on the host by design (``critical_buffer.slot_on_host``); an
accelerator's tensors never do. These tests step the accelerator's form on CPU tensors
(``slot_on_host`` off), so that a host read anywhere else fails them."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from dropin_common import dropin, mlp, mse
from memopt_func import _slot_write
from memopt_func import critical_buffer as cb

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    def make(method):
        def boom(self, *args, **kwargs):
            raise HostSync(f"Tensor.{method} called inside step() (a host sync)")

        return boom

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_slot_write, "slot_on_host", lambda buf: False))
        for method in SYNC_METHODS:
            stack.enter_context(mock.patch.object(torch.Tensor, method, make(method)))
        yield


def test_the_guard_catches_host_reads():
    """The guard itself: every patched read raises inside and works again outside."""
    t = torch.tensor(1.5)
    i = torch.tensor(2)
    with no_host_sync():
        for read in (t.item, t.tolist, lambda: bool(t), lambda: float(t), lambda: int(t), lambda: [0, 1, 2][i],
                     lambda: t > 1 and 1):
            with pytest.raises(HostSync):
                read()
        torch.zeros(3)[1:] + t  # device-side work is fine
    assert t.item() == 1.5 and bool(t) and int(i) == 2


def test_slot_index_is_read_on_the_host_only_for_cpu_tensors():
    """The host read is a CPU privilege: never for an accelerator's (here: meta) tensors."""
    assert cb.slot_on_host(torch.zeros(2, 3))
    assert not cb.slot_on_host(torch.zeros(2, 3, device="meta"))


CONFIGS = [
    ("Adam_CM", dict(lr=1e-2, topC=3)),
    ("Adam_CM", dict(lr=1e-2, topC=3, synced=False, amsgrad=True, weight_decay=0.1, critical_test=0.5)),
    ("Adam_C", dict(lr=1e-2, topC=3, critical_test=0.3, aggr="mean")),
    ("Adam_C", dict(lr=1e-2, topC=2, synced=False, weight_decay=0.01, buffer_dtype=torch.float32)),
    ("RMSprop_C", dict(lr=1e-3, topC=3, momentum=0.5, centered=True, critical_test=0.2)),
    ("RMSprop_C", dict(lr=1e-3, topC=3, synced=False)),
    ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, dampening=0.1, weight_decay=0.01, critical_test=0.9)),
    ("SGD_C", dict(lr=1e-2, topC=3, synced=False, aggr="buffer")),
    ("AdEMAMix", dict(lr=1e-2, weight_decay=0.1)),
    ("AdEMAMix", dict(lr=1e-2, beta3_warmup=5, alpha_warmup=4)),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.999))),
    ("AdEMAMix_C", dict(lr=1e-2, topC=3, critical_test=0.3, beta3_warmup=5, alpha_warmup=4)),
    ("AdEMAMix_C", dict(lr=1e-2, topC=2, synced=False, aggr="mean", weight_decay=0.1, buffer_dtype=torch.float32)),
]


def _id(cfg):
    name, kw = cfg
    return name + "-" + ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items())


def _steps_without_sync(model, opt, start, n, skip_first_param_at=None):
    params = list(model.parameters())
    for k in range(start, start + n):
        opt.zero_grad()
        mse(model, k).backward()
        if k == skip_first_param_at:
            params[0].grad = None
        before = [p.detach().clone() for p in params]
        with no_host_sync():
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, params)), "the guarded step did nothing"


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_id(c) for c in CONFIGS])
def test_step_does_not_sync(cfg, tensor_lr):
    name, kwargs = cfg
    model = mlp()
    opt = dropin(name)(model.parameters(), **kwargs)
    if tensor_lr:
        opt.param_groups[0]["lr"] = torch.tensor(kwargs["lr"], dtype=torch.float64)
    opt.zero_grad()
    mse(model, 0).backward()
    opt.step()  # the first step may set things up
    # through the fill phase into the full-buffer phase, one step with a parameter lacking .grad
    _steps_without_sync(model, opt, 1, 6, skip_first_param_at=3)
    if tensor_lr:
        # a tensor lr changed in place between steps is honoured, still without a sync
        opt.param_groups[0]["lr"].fill_(kwargs["lr"] / 10)
        _steps_without_sync(model, opt, 7, 2)


@pytest.mark.parametrize("name", ["Adam_CM", "SGD_C", "AdEMAMix", "AdEMAMix_C"])
def test_tensor_lr_switched_in_after_float_steps_does_not_sync(name):
    kwargs = dict(lr=1e-2) if name == "AdEMAMix" else dict(lr=1e-2, topC=3, momentum=0.9) if name == "SGD_C" else dict(lr=1e-2, topC=3)
    model = mlp()
    opt = dropin(name)(model.parameters(), **kwargs)
    for k in range(2):
        opt.zero_grad()
        mse(model, k).backward()
        opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(5e-3, dtype=torch.float64)
    _steps_without_sync(model, opt, 2, 3)


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix", "AdEMAMix_C"])
def test_tensor_lr_gives_the_same_run_as_float_lr(name):
    """A 0-d tensor lr is the same hyperparameter as the float (to float64 rounding)."""
    kwargs = dict(lr=1e-2) if name == "AdEMAMix" else dict(lr=1e-2, topC=3)
    a, b = mlp(), mlp()
    oa = dropin(name)(a.parameters(), **kwargs)
    ob = dropin(name)(b.parameters(), **kwargs)
    ob.param_groups[0]["lr"] = torch.tensor(kwargs["lr"], dtype=torch.float64)
    for k in range(8):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            mse(m, k).backward()
            o.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, rtol=1e-13, atol=0), (x - y).abs().max()  # rounding of lr/(1-b1**t) may differ


def test_device_form_of_sgd_first_step_starts_the_buffer_at_d_as_torch_optim():
    """Off the host (an accelerator's form, here on CPU tensors) SGD's first step sets the
    momentum buffer to d, undampened, as torch.optim.SGD does; the host form reads the flag."""
    from memopt_func import rules

    torch.manual_seed(0)
    p0 = torch.randn(7, 3)
    grads = [torch.randn(7, 3) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
    rule = rules.SGD(lr=0.1, momentum=0.9, dampening=0.5)
    params, state = p0.clone(), rule.init(p0)
    with mock.patch.object(_slot_write, "slot_on_host", lambda buf: False):
        for g in grads:
            ref.grad = g.clone()
            opt.step()
            params, state = rule.step(params, g, state, donate=True)
            assert torch.equal(params, ref.detach())
