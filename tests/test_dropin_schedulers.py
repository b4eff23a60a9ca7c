"""torch.optim.lr_scheduler and torch.amp.GradScaler driving the drop-ins.

The hyperparameters a scheduler writes into the param group must be the ones the step uses:
each run is compared bit for bit with the functional rule stepped with the same per-step
overrides (lr=..., betas=... / momentum=...), and against a run that ignores them.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler as S

from dropin_common import (
    OPTIMIZERS,
    assert_params_equal,
    assert_state_equal,
    dropin,
    mlp,
    mse,
    rule,
    snapshot_state,
)

BASE = {
    "Adam_CM": dict(lr=1e-2, topC=3),
    "Adam_C": dict(lr=1e-2, topC=3, synced=False),
    "RMSprop_C": dict(lr=1e-2, topC=3, centered=True),
    "SGD_C": dict(lr=5e-2, topC=3, weight_decay=0.01),
    "AdEMAMix": dict(lr=1e-2, beta3_warmup=8),
    "AdEMAMix_C": dict(lr=1e-2, topC=3, beta3_warmup=8, synced=False),
}
# OneCycleLR(cycle_momentum=True) on SGD_C / RMSprop_C needs them built with momentum != 0.
ONE_CYCLE = {**BASE, "RMSprop_C": dict(lr=1e-2, topC=3, momentum=0.5), "SGD_C": dict(lr=5e-2, topC=3, momentum=0.9)}
# The group entry OneCycleLR(cycle_momentum=True) cycles: beta1 where the optimizer has betas, else momentum.
MOMENTUM_KEY = {"Adam_CM": "betas", "Adam_C": "betas", "RMSprop_C": "momentum", "SGD_C": "momentum", "AdEMAMix": "betas",
                "AdEMAMix_C": "betas"}
STEPS = 16


def _drive(name, kwargs, make_scheduler, advance, overrides=("lr",), dtype=torch.float64):
    """Run the drop-in under a scheduler next to the rule with per-step overrides of ``overrides``.

    Returns (hyperparameters used at each step, final params of the drop-in).
    """
    model = mlp(dtype=dtype)
    params = list(model.parameters())
    opt = dropin(name)(params, **kwargs)
    sched = make_scheduler(opt)
    r = rule(name)(**kwargs)
    fparams = [p.detach().clone() for p in params]
    fstate = r.init(fparams)
    used = []
    for k in range(STEPS):
        opt.zero_grad()
        loss = mse(model, k)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        per_step = {key: opt.param_groups[0][key] for key in overrides}
        used.append(per_step)
        opt.step()
        fparams, fstate = r.step(fparams, grads, fstate, **per_step)
        assert_params_equal(params, fparams, f"{name} under {type(sched).__name__}, step {k}")
        advance(sched, k, loss.item())
    return used, [p.detach().clone() for p in params]


def _constant_run(name, kwargs, dtype=torch.float64, lrs=None):
    """The rule with the group's hyperparameters held at their initial values (but the lr of
    step k, lrs[k], when lrs is given)."""
    model = mlp(dtype=dtype)
    params = list(model.parameters())
    r = rule(name)(**kwargs)
    fparams = [p.detach().clone() for p in params]
    fstate = r.init(fparams)
    for k in range(STEPS):
        model.zero_grad()
        with torch.no_grad():
            for p, f in zip(params, fparams):
                p.copy_(f)
        mse(model, k).backward()
        per_step = {} if lrs is None else {"lr": lrs[k]}
        fparams, fstate = r.step(fparams, [p.grad.clone() for p in params], fstate, **per_step)
    return fparams


def _differs(a, b):
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def _plain(sched, k, loss):
    sched.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_lr(name):
    kwargs = BASE[name]
    used, final = _drive(name, kwargs, lambda o: S.StepLR(o, step_size=4, gamma=0.5), _plain)
    lrs = [u["lr"] for u in used]
    assert lrs == pytest.approx([kwargs["lr"] * 0.5 ** (k // 4) for k in range(STEPS)], rel=1e-15)
    assert _differs(final, _constant_run(name, kwargs)), "the scheduled lr made no difference"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lambda_lr(name):
    kwargs = BASE[name]
    used, final = _drive(name, kwargs, lambda o: S.LambdaLR(o, lambda k: 1.0 / (1 + k)), _plain)
    lrs = [u["lr"] for u in used]
    assert lrs == pytest.approx([kwargs["lr"] / (1 + k) for k in range(STEPS)], rel=1e-15)
    assert _differs(final, _constant_run(name, kwargs))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_reduce_lr_on_plateau(name):
    kwargs = BASE[name]
    # a metric that never improves: the lr halves after every `patience + 1` bad epochs
    used, final = _drive(
        name, kwargs, lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1), lambda s, k, loss: s.step(1.0)
    )
    lrs = [u["lr"] for u in used]
    assert lrs[0] == kwargs["lr"] and lrs[-1] < kwargs["lr"] / 4
    assert _differs(final, _constant_run(name, kwargs))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_cycle_lr_cycles_lr_and_momentum(name):
    kwargs = ONE_CYCLE[name]
    key = MOMENTUM_KEY[name]

    def make(o):
        return S.OneCycleLR(o, max_lr=3 * kwargs["lr"], total_steps=STEPS, cycle_momentum=True)

    used, final = _drive(name, kwargs, make, _plain, overrides=("lr", key))
    lrs = [u["lr"] for u in used]
    moms = [u[key][0] if key == "betas" else u[key] for u in used]
    assert len(set(lrs)) > STEPS // 2 and max(lrs) == pytest.approx(3 * kwargs["lr"], rel=0.05)
    assert min(moms) == pytest.approx(0.85, abs=0.01) and max(moms) == pytest.approx(0.95, abs=1e-12)
    if key == "betas":
        assert all(len(u["betas"]) == len(rule(name)().hyper["betas"]) for u in used), "OneCycleLR kept the other betas"
    # the momentum the scheduler wrote is used: the same lrs with a fixed momentum give another run
    assert _differs(final, _constant_run(name, kwargs, lrs=lrs)), "the cycled momentum made no difference"


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not supported here: {e}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_skips_the_inf_step(name):
    kwargs = BASE[name]
    scaler = _grad_scaler()
    model = mlp(dtype=torch.float32)
    params = list(model.parameters())
    opt = dropin(name)(params, **kwargs)
    r = rule(name)(**kwargs)
    fparams = [p.detach().clone() for p in params]
    fstate = r.init(fparams)
    inf_step = 3
    for k in range(7):
        opt.zero_grad()
        scaler.scale(mse(model, k)).backward()
        if k == inf_step:
            params[0].grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        grads = [p.grad.detach().clone() for p in params]
        p_before, s_before, scale_before = [p.detach().clone() for p in params], snapshot_state(opt), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if k == inf_step:
            assert_params_equal(params, p_before, "the inf step must be skipped")
            assert_state_equal(snapshot_state(opt), s_before, "state after the skipped step")
            assert scaler.get_scale() < scale_before
        else:
            fparams, fstate = r.step(fparams, grads, fstate)
            assert_params_equal(params, fparams, f"{name} with GradScaler, step {k}")
    assert all(torch.isfinite(p).all() for p in params)
    assert float(opt.state[params[0]]["step"]) == 6.0
