"""The rules under torch.func: vmap over an ensemble (each member exactly as if stepped alone),
and differentiation through steps with respect to hyperparameters and incoming gradients."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap
from torch import nn

from memopt_func import rules

CRITICAL = ("Adam_C", "Adam_CM", "RMSprop_C", "SGD_C")
ALL = ("Adam", "AdamW", "SGD", "RMSprop", "AdEMAMix") + CRITICAL
E = 4


def _hyper(name, synced=True, **extra):
    h = dict(lr=1e-2, **extra)
    if name in CRITICAL:
        h.update(topC=3, decay=0.95, synced=synced)
    if name in ("SGD", "SGD_C", "RMSprop", "RMSprop_C"):
        h.update(momentum=0.9)
    if name == "AdEMAMix":
        h.update(alpha=5.0, beta3_warmup=6, alpha_warmup=6)
    return h


def _stream(k, params):
    """Member gradients whose scales are shuffled per step, so each member's buffer decides differently."""
    gen = torch.Generator().manual_seed(k)
    scales = torch.logspace(-2, 2, E, dtype=torch.float64)[torch.randperm(E, generator=gen)]
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) * scales.view(E, *[1] * (p.dim() - 1)) for p in params]


@pytest.mark.parametrize("synced", [True, False])
@pytest.mark.parametrize("name", ALL)
def test_vmap_ensemble_equals_separate_runs_bitwise(name, synced):
    if name not in CRITICAL and not synced:
        pytest.skip("no buffer")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(E, 3, 2, generator=gen, dtype=torch.float64), torch.randn(E, 2, generator=gen, dtype=torch.float64)]
    rule = rules.RULES[name](**_hyper(name, synced))
    state = vmap(rule.init)(params)
    step = vmap(rule.step)
    ens_params = params
    for k in range(12):  # through the buffer's filling and the warmups
        ens_params, state = step(ens_params, _stream(k, params), state)
    alone = rules.RULES[name](**_hyper(name, synced), foreach=False)
    admitted = set()
    for e in range(E):
        p = [t[e].clone() for t in params]
        s = alone.init(p)
        for k in range(12):
            p, s = alone.step(p, [g[e] for g in _stream(k, params)], s)
        for a, b in zip(p, ens_params):
            assert torch.equal(a, b[e]), f"member {e} differs from its own run"
        if name in CRITICAL:
            assert torch.equal(s.critical.keys, state.critical.keys[e])
            admitted.add(int(s.critical.accepted.sum()))
    if name in CRITICAL:
        assert len(admitted) > 1 or synced is False, "members should take different admission decisions"


# b1 = 0.99: ATen's vectorised CPU pow (SLEEF) and libm disagree on 0.99**t at t = 25, 32, 34, 36, 37
POW_BETAS = (0.99, 0.999)
POSITION_STEPS = 40


def _position_hyper(name):
    h = _hyper(name, synced=False)
    h["betas"] = POW_BETAS + ((0.9999,) if name == "AdEMAMix" else ())
    if name == "AdEMAMix":
        h.update(beta3_warmup=30, alpha_warmup=30)  # the warmups' log and pow run through the steps
    return h


@pytest.mark.parametrize("name", ("Adam", "AdamW", "AdEMAMix", "Adam_C", "Adam_CM"))
def test_a_leaf_steps_the_same_wherever_it_sits(name):
    """Each leaf's bias corrections and warmup schedules are per-leaf scalars computed as one
    vector; a leaf among twelve (in the vectorised body of the CPU kernels) and the same leaf
    alone (their scalar tail) step bitwise alike, and so do twelve vmap members."""
    assert any(torch.pow(POW_BETAS[0], torch.arange(1.0, 41.0, dtype=torch.float64)) != torch.tensor([POW_BETAS[0] ** k for k in range(1, 41)], dtype=torch.float64))
    gen = torch.Generator().manual_seed(3)
    n = 12
    leaves = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(n)]
    grads = [[torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(n)] for _ in range(POSITION_STEPS)]
    rule = rules.RULES[name](**_position_hyper(name))
    together, state = list(leaves), rule.init(leaves)
    for g in grads:
        together, state = rule.step(together, g, state)
    members = [torch.stack(leaves)]
    mstate = vmap(rule.init)(members)
    for g in grads:
        members, mstate = vmap(rule.step)(members, [torch.stack(g)], mstate)
    alone_rule = rules.RULES[name](**_position_hyper(name), foreach=False)
    for i in range(n):
        p, s = [leaves[i]], alone_rule.init([leaves[i]])
        for g in grads:
            p, s = alone_rule.step(p, [g[i]], s)
        assert torch.equal(p[0], together[i]), f"leaf {i} of {n} differs from its own run"
        assert torch.equal(p[0], members[0][i]), f"vmap member {i} of {n} differs from its own run"


def test_a_cpu_tensor_beta_beside_device_step_counters_is_computed_as_before():
    """``_math.power`` widens only all-CPU arguments: a 0-d CPU beta beside another device's
    step vector (``meta`` here, as an accelerator's) broadcasts as ``b ** t`` does."""
    from memopt_func import _math as M

    t = torch.ones(3, dtype=torch.float64, device="meta")
    assert M.power(torch.tensor(0.999, dtype=torch.float64), t).device.type == "meta"
    assert M.power(0.999, t).shape == (3,)


def test_foreach_false_equals_foreach_to_rounding_and_true_is_refused_under_vmap():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 3, generator=gen, dtype=torch.float64)]
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.float64)]
    a, b = rules.Adam_CM(lr=1e-2, foreach=False), rules.Adam_CM(lr=1e-2, foreach=True)
    pa, sa = a.step(params, grads, a.init(params))
    pb, sb = b.step(params, grads, b.init(params))
    pa, sa = a.step(pa, grads, sa)
    pb, sb = b.step(pb, grads, sb)
    torch.testing.assert_close(pa[0], pb[0], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="foreach"):
        rules.Adam(foreach="yes")
    stacked = [torch.randn(2, 5, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="vmap"):
        vmap(b.step)(stacked, stacked, vmap(b.init)(stacked))


def test_model_ensembling_recipe():
    """stack_module_state + functional_call + vmap(grad) + vmap(rule.step), as the functional guide shows."""
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double() for _ in range(E)]
    params, _ = stack_module_state(members)
    base = members[0]
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def loss(p, x, y):
        return ((functional_call(base, p, (x,)) - y) ** 2).mean()

    rule = rules.Adam_CM(lr=1e-2, topC=3)
    state = vmap(rule.init)(params)
    for _ in range(5):
        g = vmap(grad(loss), in_dims=(0, None, None))(params, x, y)
        params, state = vmap(rule.step)(params, g, state)
    for e, m in enumerate(members):
        p = {k: v.detach().clone() for k, v in m.named_parameters()}
        s = rules.Adam_CM(lr=1e-2, topC=3, foreach=False).init(p)
        for _ in range(5):
            p, s = rules.Adam_CM(lr=1e-2, topC=3, foreach=False).step(p, grad(loss)(p, x, y), s)
        for k in p:
            torch.testing.assert_close(p[k], params[k][e], rtol=1e-12, atol=1e-14)


def _meta_run(name, lr, steps=3, through_grads=True):
    """Steps whose gradients come from the current parameters (the meta-learning case)."""
    rule = rules.RULES[name](**{**_hyper(name), "lr": 1e-2})
    p = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)]
    s = rule.init(p)
    target = torch.tensor([0.3, 0.1, -0.4], dtype=torch.float64)
    for k in range(steps):
        loss = ((p[0] - target) ** 2 * (1.0 + k)).sum()
        (g,) = torch.autograd.grad(loss, p, create_graph=through_grads)
        p, s = rule.step(p, [g], s, lr=lr)
    return (p[0] ** 2).sum()


@pytest.mark.parametrize("name", ALL)
def test_grad_through_steps_matches_finite_differences(name):
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(_meta_run(name, lr), lr)
    h = 1e-6
    fd = (_meta_run(name, torch.tensor(0.05 + h, dtype=torch.float64)) - _meta_run(name, torch.tensor(0.05 - h, dtype=torch.float64))) / (2 * h)
    torch.testing.assert_close(auto, fd.detach(), rtol=1e-6, atol=1e-9)
    assert torch.func.grad(lambda lr: _meta_run(name, lr))(torch.tensor(0.05, dtype=torch.float64)).item() == pytest.approx(auto.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["AdamW", "Adam_C", "AdEMAMix"])
def test_grad_with_respect_to_weight_decay(name):
    rule = rules.RULES[name](lr=1e-2)
    p0 = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    gs = [[torch.tensor([0.3 * (k + 1), -0.2], dtype=torch.float64)] for k in range(4)]

    def run(wd):
        p, s = p0, rule.init(p0)
        for g in gs:
            p, s = rule.step(p, g, s, weight_decay=wd)
        return p[0].sum()

    wd = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(run(wd), wd)
    h = 1e-6
    fd = (run(torch.tensor(0.1 + h, dtype=torch.float64)) - run(torch.tensor(0.1 - h, dtype=torch.float64))) / (2 * h)
    torch.testing.assert_close(auto, fd, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_vmap_keeps_float32_members_in_float32(name):
    """Per-leaf scalars are float64 0-d tensors; under vmap they are batched, and must not
    promote a float32 member (the multi-tensor kernels use them in the member's dtype)."""
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(E, 5, 3, generator=gen), "b": torch.randn(E, 3, generator=gen)}
    rule = rules.RULES[name](**_hyper(name))
    state = vmap(rule.init)(params)
    out = params
    for k in range(3):
        g = {key: torch.randn(v.shape, generator=gen) for key, v in params.items()}
        out, state = vmap(rule.step)(out, g, state)
    assert all(v.dtype == torch.float32 for v in out.values())
