"""``rules.with_critical_buffer`` (a critical buffer over any rule) and ``optim.from_rule`` (any
rule as a drop-in optimizer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt_func import compiled, optim, rules


def _run(rule, steps=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)]
    state = rule.init(params)
    for k in range(steps):
        scale = 10.0 ** ((k * 7) % 5 - 2)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale for p in params]
        params, state = rule.step(params, grads, state)
    return params, state


CRIT = dict(topC=3, decay=0.95, kappa=0.8)


@pytest.mark.parametrize(
    "base, named",
    [
        (rules.Adam(lr=1e-2, weight_decay=0.1, amsgrad=True), rules.Adam_C),
        (rules.RMSprop(lr=1e-3, momentum=0.5, centered=True), rules.RMSprop_C),
        (rules.SGD(lr=1e-2, momentum=0.9, weight_decay=0.01), rules.SGD_C),
    ],
    ids=["Adam", "RMSprop", "SGD"],
)
def test_over_adam_rmsprop_sgd_it_is_the_named_rule(base, named):
    combined = rules.with_critical_buffer(base, **CRIT)
    assert type(combined) is named
    direct = named(**{k: v for k, v in base.hyper.items() if k in named.__signature__.parameters}, **CRIT)
    for a, b in zip(_run(combined)[0], _run(direct)[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "base",
    [rules.AdEMAMix(lr=1e-2, alpha=5.0, beta3_warmup=10), rules.AdamW(lr=1e-2, weight_decay=0.1), rules.RMSprop(lr=1e-3, momentum=0.9)],
    ids=["AdEMAMix", "AdamW", "RMSprop-momentum"],
)
def test_kappa_zero_is_the_base_rule(base):
    combined = rules.with_critical_buffer(base, topC=3, kappa=0.0)
    for a, b in zip(_run(combined)[0], _run(base)[0]):
        assert torch.equal(a, b)


def test_over_adamw_without_decay_equals_adam_c():
    """AdamW and Adam differ only in how weight decay enters: at 0 their buffered forms agree."""
    a = rules.with_critical_buffer(rules.AdamW(lr=1e-2, weight_decay=0.0), **CRIT)
    assert type(a).__name__ == "AdamW_C"
    for x, y in zip(_run(a)[0], _run(rules.Adam_C(lr=1e-2, **CRIT))[0]):
        assert torch.equal(x, y)


def test_over_ademamix_the_buffer_decides_and_changes_the_run():
    combined = rules.with_critical_buffer(rules.AdEMAMix(lr=1e-2, alpha=5.0), topC=2, decay=0.99)
    params, state = _run(combined, steps=20)
    crit = state.critical
    assert 0 < int(crit.accepted.sum()) < int(crit.offers.sum()), "the buffer should both admit and refuse"
    plain, _ = _run(rules.AdEMAMix(lr=1e-2, alpha=5.0), steps=20)
    assert not torch.equal(params[0], plain[0])


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="already keeps a critical buffer"):
        rules.with_critical_buffer(rules.Adam_C())
    with pytest.raises(ValueError, match="already keeps a critical buffer"):
        rules.with_critical_buffer(rules.Adam_CM())
    with pytest.raises(ValueError, match="nesterov"):
        rules.with_critical_buffer(rules.SGD(momentum=0.9, nesterov=True))
    with pytest.raises(TypeError, match="bogus"):
        rules.with_critical_buffer(rules.Adam(), bogus=1)
    with pytest.raises(ValueError, match="topC"):
        rules.with_critical_buffer(rules.Adam(), topC=-1)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _loss(model, k):
    gen = torch.Generator().manual_seed(k)
    return (model(torch.randn(16, 4, generator=gen, dtype=torch.float64)) ** 2).mean()


def test_from_rule_is_a_full_drop_in():
    rule = rules.with_critical_buffer(rules.AdEMAMix(lr=1e-2, alpha=3.0), topC=3, decay=0.9)
    model, twin_model = _model(), _model()
    opt = optim.from_rule(model.parameters(), rule)
    assert isinstance(opt, torch.optim.Optimizer) and type(opt).__name__ == "AdEMAMix_COptimizer"
    assert opt.defaults["topC"] == 3 and opt.defaults["alpha"] == 3.0
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    params, state = [p.detach().clone() for p in twin_model.parameters()], rule.init(list(twin_model.parameters()))
    for k in range(6):
        opt.zero_grad()
        _loss(model, k).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        params, state = rule.step(params, grads, state, lr=opt.param_groups[0]["lr"])
        sched.step()
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    # state_dict round trip through weights_only, and a resume that continues bit-identically
    sd = opt.state_dict()
    resumed = optim.from_rule(_model(1).parameters(), rule)
    with torch.no_grad():
        for p, q in zip(resumed.param_groups[0]["params"], model.parameters()):
            p.copy_(q)
    resumed.load_state_dict(sd)
    with pytest.raises(ValueError, match="AdEMAMix_C.*Adam_C"):
        optim.Adam_C(_model().parameters()).load_state_dict(sd)
    stats = opt.get_offline_stats()
    assert stats["offers"] == 6


def test_from_rule_over_a_base_rule_and_compiled():
    model, twin = _model(), _model()
    a = optim.from_rule(model.parameters(), rules.AdamW(lr=1e-2, weight_decay=0.1))
    b = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    for k in range(5):
        for m, o in ((model, a), (twin, b)):
            o.zero_grad()
            _loss(m, k).backward()
            o.step()
    for x, y in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    fast = compiled.compile_optimizer(a)
    assert isinstance(fast, compiled.CompiledOptimizer) and fast.RULE is rules.AdamW
    with pytest.raises(TypeError, match="rule"):
        optim.from_rule(model.parameters(), torch.optim.AdamW)
