"""Param groups of the drop-ins: per-group hyperparameters, add_param_group mid-run, step(closure),
zero_grad, and parameters without a gradient."""

from __future__ import annotations

import pytest
import torch

from dropin_common import CRITICAL, GROUP_KEYS, OPTIMIZERS, assert_params_equal, dropin, mlp, mse, rule

# Two groups per optimizer, with different hyperparameters (topC, synced, alpha, lr, ...).
GROUPS = {
    "Adam_CM": (dict(lr=1e-2, topC=2), dict(lr=3e-3, topC=4, synced=False, weight_decay=0.1, betas=(0.8, 0.99))),
    "Adam_C": (dict(lr=1e-2, topC=3, synced=False), dict(lr=3e-3, topC=5, amsgrad=True, aggr="mean")),
    "RMSprop_C": (dict(lr=1e-3, topC=2), dict(lr=2e-3, topC=4, synced=False, centered=True, alpha=0.9)),
    "SGD_C": (dict(lr=1e-2, topC=2, synced=False), dict(lr=5e-2, topC=5, decay=0.5, weight_decay=0.01)),
    "AdEMAMix": (dict(lr=1e-2, alpha=2.0), dict(lr=3e-3, alpha=5.0, beta3_warmup=4, alpha_warmup=3)),
    "AdEMAMix_C": (dict(lr=1e-2, topC=2, alpha=2.0),
                   dict(lr=3e-3, topC=4, synced=False, alpha=5.0, beta3_warmup=4, aggr="mean", decay=0.9)),
}
DEFAULTS = {
    "Adam_CM": dict(lr=1e-3, topC=3),
    "Adam_C": dict(lr=1e-3, topC=3),
    "RMSprop_C": dict(lr=1e-3, topC=3),
    "SGD_C": dict(lr=1e-3, topC=3),
    "AdEMAMix": dict(lr=1e-3),
    "AdEMAMix_C": dict(lr=1e-3, topC=3),
}


def _grads(model, k):
    model.zero_grad(set_to_none=True)
    mse(model, k).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_groups_with_different_hyperparameters(name):
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    g0, g1 = GROUPS[name]
    opt = dropin(name)([dict(params=[w1, b1], **g0), dict(params=[w2, b2], **g1)], **DEFAULTS[name])
    assert opt.param_groups[0]["lr"] == g0["lr"] and opt.param_groups[1]["lr"] == g1["lr"]
    r0 = rule(name)(**{**DEFAULTS[name], **g0})
    r1 = rule(name)(**{**DEFAULTS[name], **g1})
    f0, f1 = [w1.detach().clone(), b1.detach().clone()], [w2.detach().clone(), b2.detach().clone()]
    s0, s1 = r0.init(f0), r1.init(f1)
    for k in range(12):
        grads = _grads(model, k)
        opt.step()
        f0, s0 = r0.step(f0, grads[:2], s0)
        f1, s1 = r1.step(f1, grads[2:], s1)
        assert_params_equal([w1, b1], f0, f"{name} group 0 step {k}")
        assert_params_equal([w2, b2], f1, f"{name} group 1 step {k}")
    # each group's buffer layout follows its own topC / synced
    if name in CRITICAL:
        for params, cfg in (([w1, b1], g0), ([w2, b2], g1)):
            top_c, synced = cfg["topC"], cfg.get("synced", True)
            assert opt.state[params[0]]["critical_buf"].shape[0] == top_c
            if synced:
                assert opt.state[params[0]]["critical_keys"].shape == (1, top_c)
                assert "critical_keys" not in opt.state[params[1]]
            else:
                assert opt.state[params[1]]["critical_keys"].shape == (top_c,)
                assert int(opt.state[params[1]]["critical_count"]) == min(12, top_c)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_add_param_group_after_steps(name):
    """The new group starts fresh (its own step 1, empty buffer); the old group continues."""
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    g0, g1 = GROUPS[name]
    opt = dropin(name)([dict(params=[w1, b1], **g0)], **DEFAULTS[name])
    r0 = rule(name)(**{**DEFAULTS[name], **g0})
    r1 = rule(name)(**{**DEFAULTS[name], **g1})
    f0 = [w1.detach().clone(), b1.detach().clone()]
    s0 = r0.init(f0)
    w2_0, b2_0 = w2.detach().clone(), b2.detach().clone()
    for k in range(5):
        grads = _grads(model, k)
        opt.step()
        f0, s0 = r0.step(f0, grads[:2], s0)
    assert torch.equal(w2, w2_0) and torch.equal(b2, b2_0), "a parameter outside the optimizer moved"
    assert w2 not in opt.state or not opt.state[w2]
    opt.add_param_group(dict(params=[w2, b2], **g1))
    assert len(opt.param_groups) == 2
    for key, value in g1.items():
        assert opt.param_groups[1][key] == value
    # unspecified hyperparameters come from the defaults
    for key, value in DEFAULTS[name].items():
        if key not in g1:
            assert opt.param_groups[1][key] == value
    f1 = [w2_0.clone(), b2_0.clone()]
    s1 = r1.init(f1)
    for k in range(5, 15):
        grads = _grads(model, k)
        opt.step()
        f0, s0 = r0.step(f0, grads[:2], s0)
        f1, s1 = r1.step(f1, grads[2:], s1)
        assert_params_equal([w1, b1], f0, f"{name} old group step {k}")
        assert_params_equal([w2, b2], f1, f"{name} new group step {k}")
    assert float(opt.state[w1]["step"]) == 15.0
    assert float(opt.state[w2]["step"]) == 10.0
    if name in CRITICAL:
        # the new group's buffer filled from empty at its own pace
        top_c = g1["topC"]
        row = opt.state[w2]["critical_count"]
        assert row.dtype == torch.int64 and int(row.reshape(-1)[0]) == min(10, top_c)
        assert int(opt.state[w2]["critical_offers"].reshape(-1)[0]) == 10


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_closure_returns_its_loss(name):
    model = mlp()
    opt = dropin(name)(model.parameters(), **DEFAULTS[name])
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = mse(model, 0)
        loss.backward()  # fails if the closure were run under no_grad
        return loss

    out = opt.step(closure)
    assert calls == [True], "the closure runs exactly once, with grad enabled"
    assert out is not None and torch.is_tensor(out)
    assert torch.equal(out.detach(), mse(mlp(), 0).detach())
    opt.step(closure)  # (Adam_CM's first step moves p only by weight decay, so look after two)
    assert len(calls) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step used the closure's gradients"
    # without a closure, step returns None
    opt.zero_grad()
    mse(model, 1).backward()
    assert opt.step() is None


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_closure_matches_step_without(name):
    a, b = mlp(), mlp()
    oa = dropin(name)(a.parameters(), **DEFAULTS[name])
    ob = dropin(name)(b.parameters(), **DEFAULTS[name])
    for k in range(6):
        def closure(k=k):
            oa.zero_grad()
            loss = mse(a, k)
            loss.backward()
            return loss

        oa.step(closure)
        ob.zero_grad()
        mse(b, k).backward()
        ob.step()
    assert_params_equal(list(a.parameters()), list(b.parameters()), name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_grad(name):
    model = mlp()
    opt = dropin(name)(model.parameters(), **DEFAULTS[name])
    mse(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    mse(model, 0).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # a step with no gradients at all changes nothing and creates no state
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert_params_equal(list(model.parameters()), before, "no-grad step")
    assert not any(opt.state.get(p) for p in model.parameters())


def _state_copy(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("name", CRITICAL)
def test_param_without_grad_is_skipped_synced(name):
    """Synced group: the skipped parameter and its own state stay put; the group's keys/count still move."""
    top_c = 4
    model = mlp()
    params = list(model.parameters())
    opt = dropin(name)(params, lr=1e-2, topC=top_c, synced=True, decay=0.5)
    for k in range(2):
        opt.zero_grad()
        mse(model, k).backward()
        opt.step()
    for skipped in (0, 2):  # the group's row sits with parameter 0; also skip a non-first one
        opt.zero_grad()
        mse(model, 2 + skipped).backward()
        params[skipped].grad = None
        p_before = [p.detach().clone() for p in params]
        s_before = [_state_copy(opt, p) for p in params]
        count_before = int(opt.state[params[0]]["critical_count"][0])
        offers_before = int(opt.state[params[0]]["critical_offers"][0])
        keys_before = opt.state[params[0]]["critical_keys"].clone()
        opt.step()
        assert torch.equal(params[skipped], p_before[skipped]), "a parameter without .grad moved"
        own = lambda key: key not in GROUP_KEYS  # noqa: E731
        for key in filter(own, s_before[skipped]):
            assert torch.equal(opt.state[params[skipped]][key], s_before[skipped][key]), f"skipped param's {key} changed"
        for i, p in enumerate(params):
            if i != skipped:
                assert not torch.equal(p, p_before[i]), f"param {i} (with a gradient) did not move"
                assert float(opt.state[p]["step"]) == float(s_before[i]["step"]) + 1
        assert int(opt.state[params[0]]["critical_count"][0]) == min(count_before + 1, top_c)
        assert int(opt.state[params[0]]["critical_offers"][0]) == offers_before + 1
        assert not torch.equal(opt.state[params[0]]["critical_keys"], keys_before), "group keys did not move"


@pytest.mark.parametrize("name", CRITICAL)
def test_param_without_grad_is_skipped_per_tensor(name):
    """Per-tensor buffers: the skipped parameter's whole state, its own keys/count included, stays put."""
    model = mlp()
    params = list(model.parameters())
    opt = dropin(name)(params, lr=1e-2, topC=3, synced=False)
    for k in range(2):
        opt.zero_grad()
        mse(model, k).backward()
        opt.step()
    opt.zero_grad()
    mse(model, 2).backward()
    params[1].grad = None
    p_before = [p.detach().clone() for p in params]
    s_before = [_state_copy(opt, p) for p in params]
    opt.step()
    assert torch.equal(params[1], p_before[1])
    for key, value in s_before[1].items():
        assert torch.equal(opt.state[params[1]][key], value), f"skipped param's {key} changed"
    for i in (0, 2, 3):
        assert not torch.equal(params[i], p_before[i])
        assert int(opt.state[params[i]]["critical_count"]) == 3
    assert int(opt.state[params[1]]["critical_count"]) == 2


@pytest.mark.parametrize("name", ["AdEMAMix", "Adam_CM", "AdEMAMix_C"])
def test_group_without_any_grad_is_untouched(name):
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    opt = dropin(name)([dict(params=[w1, b1]), dict(params=[w2, b2])], **DEFAULTS[name])
    for k in range(3):
        opt.zero_grad()
        mse(model, k).backward()
        opt.step()
    opt.zero_grad()
    mse(model, 3).backward()
    w2.grad = b2.grad = None
    before = {id(p): (p.detach().clone(), _state_copy(opt, p)) for p in (w2, b2)}
    w1_before = w1.detach().clone()
    opt.step()
    assert not torch.equal(w1, w1_before)
    for p in (w2, b2):
        value, state = before[id(p)]
        assert torch.equal(p, value)
        for key, v in state.items():
            assert torch.equal(opt.state[p][key], v), key
