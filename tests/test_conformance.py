"""torch.optim conformance of the drop-ins: maximize, differentiable, one-element tensor lr,
Python-number step counters in loaded state, complex parameters, and atomic steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt_func import optim

DEGENERATE = [  # (ours, kwargs, torch.optim class, kwargs): equal by SPEC.md's reductions
    ("Adam_C", dict(lr=1e-2, kappa=0.0), torch.optim.Adam, dict(lr=1e-2)),
    ("Adam_CM", dict(lr=1e-2, kappa=0.0, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ("RMSprop_C", dict(lr=1e-3, kappa=0.0, momentum=0.5), torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),
    ("SGD_C", dict(lr=1e-2, kappa=0.0, momentum=0.9), torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    ("AdEMAMix", dict(lr=1e-2, alpha=0.0, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
]
IDS = [c[0] for c in DEGENERATE]


def _twin_params(dtype=torch.float64, complex_=False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,)]
    make = lambda s: torch.randn(s, generator=gen, dtype=dtype)  # noqa: E731
    ps = [torch.complex(make(s), make(s)) if complex_ else make(s) for s in shapes]
    return [nn.Parameter(p.clone()) for p in ps], [nn.Parameter(p.clone()) for p in ps]


def _grads(k, params):
    gen = torch.Generator().manual_seed(100 + k)
    out = []
    for p in params:
        real = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        out.append(torch.complex(real, torch.randn(p.shape, generator=gen, dtype=torch.float64)) if p.is_complex() else real.to(p.dtype))
    return out


def _run_pair(ours, theirs, a, b, steps=10):
    for k in range(steps):
        for params, opt in ((a, ours), (b, theirs)):
            for p, g in zip(params, _grads(k, params)):
                p.grad = g
            opt.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", DEGENERATE, ids=IDS)
def test_maximize_matches_torch_optim(case):
    name, kw, cls, tkw = case
    a, b = _twin_params()
    _run_pair(getattr(optim, name)(a, maximize=True, **kw), cls(b, maximize=True, **tkw), a, b)


def test_maximize_follows_minus_grad_with_the_same_priority():
    a, b = _twin_params()
    up = optim.Adam_CM(a, lr=1e-2, maximize=True)
    down = optim.Adam_CM(b, lr=1e-2)
    for k in range(6):
        for p, g in zip(a, _grads(k, a)):
            p.grad = g
        for p, g in zip(b, _grads(k, b)):
            p.grad = -g
        up.step()
        down.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(up.state[a[0]]["critical_keys"], down.state[b[0]]["critical_keys"])


@pytest.mark.parametrize("case", DEGENERATE, ids=IDS)
def test_complex_parameters_match_torch_optim(case):
    name, kw, cls, tkw = case
    a, b = _twin_params(complex_=True)
    _run_pair(getattr(optim, name)(a, **kw), cls(b, **tkw), a, b)


def test_complex_priority_is_the_norm_of_the_complex_tensor():
    z = nn.Parameter(torch.complex(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)))
    opt = optim.Adam_C([z], lr=1e-2, topC=2, decay=1.0)
    z.grad = torch.full((3,), 3 + 4j, dtype=torch.complex128)
    opt.step()
    assert opt.state[z]["critical_keys"].flatten()[0].item() == pytest.approx(5.0 * 3**0.5)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("case", DEGENERATE, ids=IDS)
def test_one_element_tensor_lr_of_any_shape(case, shape):
    name, kw, cls, tkw = case
    a, b = _twin_params()
    kw = {**kw, "lr": torch.full(shape, kw["lr"], dtype=torch.float64)}
    _run_pair(getattr(optim, name)(a, **kw), cls(b, **tkw), a, b, steps=4)


def test_a_two_element_lr_is_refused_naming_lr():
    with pytest.raises(ValueError, match="lr"):
        optim.Adam_CM([nn.Parameter(torch.ones(2))], lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("case", DEGENERATE, ids=IDS)
def test_differentiable_step_matches_torch_optim_gradients(case):
    """d(final params)/d(initial params) through 3 steps, as torch.optim's differentiable=True records it."""
    name, kw, cls, tkw = case
    grads_out = []
    for make, kwargs in ((getattr(optim, name), kw), (cls, tkw)):
        leaf = torch.linspace(-1, 1, 6, dtype=torch.float64).requires_grad_()
        p = leaf.clone()
        opt = make([p], differentiable=True, **kwargs)
        for k in range(3):
            p.grad = torch.sin(p.detach() * (k + 1)) + 0.1 * k
            opt.step()
        (g,) = torch.autograd.grad(p.sum(), leaf)
        grads_out.append(g)
    torch.testing.assert_close(grads_out[0], grads_out[1], rtol=1e-10, atol=1e-12)


def test_differentiable_must_be_a_flag():
    with pytest.raises(ValueError, match="differentiable"):
        optim.Adam_CM([nn.Parameter(torch.ones(2))], differentiable="yes")


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "SGD_C", "RMSprop_C", "AdEMAMix"])
def test_state_with_python_number_steps_loads(name):
    a, b = _twin_params()
    opt = getattr(optim, name)(a, lr=1e-2)
    for k in range(3):
        for p, g in zip(a, _grads(k, a)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = float(entry["step"])
    twin = getattr(optim, name)(b, lr=1e-2)
    twin.load_state_dict(sd)
    assert all(isinstance(twin.state[p]["step"], torch.Tensor) for p in b)
    assert twin.state[b[0]]["step"].item() == 3.0


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "SGD_C", "RMSprop_C", "AdEMAMix"])
def test_a_bad_tensor_in_the_last_group_leaves_every_group_untouched(name):
    good = [nn.Parameter(torch.ones(3, dtype=torch.float64)) for _ in range(2)]
    bad = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = getattr(optim, name)([{"params": good[:1]}, {"params": good[1:]}, {"params": [bad]}], lr=1e-2)
    for p in good:
        p.grad = torch.ones(3, dtype=torch.float64)
    bad.grad = torch.ones(2, dtype=torch.float64)
    opt.param_groups[2]["lr"] = -1.0  # invalid, found only when the step checks its groups
    with pytest.raises(ValueError, match="param group 2.*lr"):
        opt.step()
    assert all(torch.equal(p, torch.ones(3, dtype=torch.float64)) for p in good)
    assert len(opt.state) == 0, "no state may be created by a failing step"
