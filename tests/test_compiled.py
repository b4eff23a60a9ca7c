"""Compiled stepping: Stepper and the compiled drop-ins against eager, without recompiles.

No timing here (bench/ measures speed). GPU checks skip without CUDA.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch._dynamo.utils import counters

from memopt_func import compiled
from memopt_func.compiled import Stepper
from memopt_func import optim, rules

SHAPES = [(6, 5), (5,), (3, 2, 2), (6, 5)]

# Small buffers and short warmups, so a few steps cross buffer filling -> full and warmup -> steady.
CONFIGS = {
    "Adam": dict(weight_decay=0.1, amsgrad=True),
    "AdamW": dict(weight_decay=0.1),
    "SGD": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    "RMSprop": dict(momentum=0.5, centered=True),
    "Adam_C": dict(topC=2, weight_decay=0.1),
    "RMSprop_C": dict(topC=2, momentum=0.5),
    "SGD_C": dict(topC=2, momentum=0.9, critical_test=0.3),
    "Adam_CM": dict(topC=2, weight_decay=0.1, amsgrad=True),
    "AdEMAMix": dict(beta3_warmup=3, alpha_warmup=4, weight_decay=0.1),
}


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _grads(k, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + k)
    scale = 10 ** (2 * torch.rand((), generator=gen).item() - 1)
    return [scale * torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def _run_against_eager(rule, flat, steps=8):
    reference = _params()
    state = rule.init(reference)
    stepper = Stepper(rule, _params(), flat=flat)
    worst = 0.0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(steps):
            lr = 1e-3 * (1 + k)  # changes every step: must not recompile
            grads = _grads(k)
            stepper.step(grads, lr=lr)
            reference, state = rule.step(reference, grads, state, lr=lr)
            worst = max(worst, max(_rel(a, b) for a, b in zip(stepper.params, reference)))
    return worst, stepper, state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_flat_stepper_equals_eager_rule(name):
    worst, stepper, _ = _run_against_eager(rules.RULES[name](**CONFIGS[name]), flat=None)
    assert stepper.flat
    assert worst < 1e-6
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", ["Adam_CM", "SGD_C"])
def test_compiled_per_tensor_stepper_equals_eager_rule(name):
    rule = rules.RULES[name](**CONFIGS[name], synced=False)
    worst, stepper, state = _run_against_eager(rule, flat=None)
    assert not stepper.flat  # per-tensor buffers cannot be flattened
    assert worst < 1e-6
    assert torch.equal(stepper.state.critical.count, state.critical.count)


def test_flat_state_per_tensor_views_match_eager_state():
    rule = rules.Adam_CM(topC=2)
    worst, stepper, state = _run_against_eager(rule, flat=True, steps=5)
    views = stepper.per_tensor_state()
    for a, b in zip(views.base.exp_avg, state.base.exp_avg):
        assert _rel(a, b) < 1e-6
    for a, b in zip(views.critical.buf, state.critical.buf):
        assert a.shape == b.shape and _rel(a, b) < 1e-6
    assert torch.equal(views.critical.count, state.critical.count)


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix"])
def test_no_recompiles_over_100_steps_with_an_lr_schedule(name):
    hyper = dict(topC=3) if name == "Adam_CM" else dict(beta3_warmup=40, alpha_warmup=60)
    rule = rules.RULES[name](**hyper)
    stepper = Stepper(rule, _params())
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), max_lr=1e-2, total_steps=100
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(100):
            stepper.step(_grads(k % 7), lr=schedule.get_last_lr()[0])
            schedule.optimizer.step()
            schedule.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("name", ["SGD_C", "Adam"])
def test_zero_weight_decay_is_a_constant_until_set_non_zero(name):
    """A zero weight decay compiles without its term; lr (from 0) never recompiles; setting the
    weight decay non-zero compiles once more; every step equals the eager rule."""
    rule = rules.RULES[name](lr=0.0, **({"topC": 2, "momentum": 0.9} if name == "SGD_C" else {}))
    reference = _params()
    state = rule.init(reference)
    stepper = Stepper(rule, _params())
    graphs = []
    for k in range(12):
        hyper = {"lr": 1e-3 * k, "weight_decay": 0.05 if 4 <= k < 8 else 0.0}
        grads = _grads(k)
        stepper.step(grads, **hyper)
        reference, state = rule.step(reference, grads, state, **hyper)
        assert max(_rel(a, b) for a, b in zip(stepper.params, reference)) < 1e-6, f"step {k + 1}"
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[:4] == [1] * 4  # lr from 0 upwards: one graph
    assert graphs[4:] == [2] * 8  # weight decay 0.05, then 0 again (now a tensor): one more graph


def test_flat_stepper_trains_a_module_in_place():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    stepper = Stepper(rules.AdamW(lr=5e-2), dict(model.named_parameters()))
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    losses = []
    for _ in range(60):
        stepper.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        stepper.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    # the module's parameters are views of the stepper's flat buffer, and so are their grads
    flat = stepper._step_params[0]
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == stepper._grads[0].untyped_storage().data_ptr()


def test_flat_stepper_refuses_bad_flags():
    stepper = Stepper(rules.Adam(), _params(), compile=False)
    with pytest.raises(ValueError, match="synced"):
        Stepper(rules.Adam_CM(synced=False), _params(), flat=True)
    with pytest.raises(ValueError, match="CUDA"):
        Stepper(rules.Adam(), _params(), cuda_graph=True)
    with pytest.raises(ValueError, match="lr"):
        stepper.set_hyper(lr=-1.0)


def test_set_hyper_writes_the_device_only_when_a_number_changes():
    """A step given the numbers its hyperparameter tensors already hold writes nothing (on a GPU,
    no fill kernel per hyperparameter per step); a new number, or any tensor, is written, and a
    bad value is still refused."""
    stepper = Stepper(rules.Adam_CM(lr=1e-2, topC=2), _params(), compile=False)
    lr = stepper._hyper["lr"]
    lr.fill_(123.0)  # behind the stepper's back: shows whether set_hyper writes
    stepper.set_hyper(lr=1e-2)
    assert lr.item() == 123.0
    stepper.set_hyper(lr=2e-2)
    assert lr.item() == 2e-2
    stepper.set_hyper(lr=torch.tensor(3e-2, dtype=torch.float64))  # a tensor is always copied
    lr.fill_(123.0)
    stepper.set_hyper(lr=torch.tensor(3e-2, dtype=torch.float64))
    assert lr.item() == 3e-2
    stepper.set_hyper(lr=3e-2)
    lr.fill_(123.0)
    stepper.set_hyper(lr=3e-2)
    assert lr.item() == 123.0
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="lr"):
            stepper.set_hyper(lr=bad)


def test_compiled_dropin_still_checks_a_gradient_replaced_after_the_first_step():
    """The flat group skips re-checking gradients only while each ``.grad`` is the view it
    installed; a gradient put there by hand is checked, and a bad one moves nothing."""
    model = _mlp()
    opt = compiled.Adam_CM(model.parameters(), lr=1e-2, topC=2)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    weight = next(model.parameters())
    weight.grad = torch.ones_like(weight).to_sparse()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    weight.grad = torch.ones_like(weight)
    opt.step()  # a well-formed hand-made gradient steps (copied into the flat buffer)
    assert not torch.equal(weight, before[0])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(model, opt, sched, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("name,hyper", [("Adam_CM", dict(topC=3)), ("SGD_C", dict(momentum=0.9, topC=2, synced=False)), ("AdEMAMix", dict(alpha_warmup=5))])
def test_compiled_dropin_matches_eager_dropin_under_a_scheduler(name, hyper):
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    m_eager, m_comp = _mlp(), _mlp()
    o_eager = getattr(optim, name)(m_eager.parameters(), lr=1e-2, **hyper)
    o_comp = getattr(compiled, name)(m_comp.parameters(), lr=1e-2, **hyper)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train(m_eager, o_eager, torch.optim.lr_scheduler.StepLR(o_eager, 2, 0.7), 9, x, y)
        _train(m_comp, o_comp, torch.optim.lr_scheduler.StepLR(o_comp, 2, 0.7), 9, x, y)
    for a, b in zip(m_comp.parameters(), m_eager.parameters()):
        assert _rel(a, b) < 1e-5
    assert isinstance(o_comp, optim.MemoryOptimizer) and isinstance(o_comp, torch.optim.Optimizer)


def test_compiled_dropin_state_dict_round_trips_with_eager():
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    m_comp = _mlp()
    o_comp = compiled.Adam_CM(m_comp.parameters(), lr=1e-2, topC=3)
    sched = torch.optim.lr_scheduler.StepLR(o_comp, 100)
    _train(m_comp, o_comp, sched, 4, x, y)
    blob = io.BytesIO()
    torch.save(o_comp.state_dict(), blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    m_eager = _mlp()
    m_eager.load_state_dict(m_comp.state_dict())
    o_eager = optim.Adam_CM(m_eager.parameters(), lr=1e-2, topC=3)
    o_eager.load_state_dict(saved)
    assert o_eager.state[next(iter(m_eager.parameters()))]["critical_count"].dtype == torch.int64
    _train(m_comp, o_comp, sched, 3, x, y)
    _train(m_eager, o_eager, torch.optim.lr_scheduler.StepLR(o_eager, 100), 3, x, y)
    for a, b in zip(m_comp.parameters(), m_eager.parameters()):
        assert _rel(a, b) < 1e-5
    twin = compiled.compile_optimizer(o_eager)
    assert type(twin) is compiled.Adam_CM and twin.param_groups[0]["topC"] == 3


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix"])
def test_torch_compile_of_dropin_step_hands_over_to_one_flat_stepper(name):
    """torch.compile(opt.step) on an eager drop-in: its step runs through one compiled flat
    stepper per param group (one graph, whatever lr does), the recipe's frame breaking once where
    it hands over; the numbers are the eager drop-in's, and opt.state holds views of the
    stepper's state, as for the compiled drop-ins."""
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    m_eager, m_comp = _mlp(), _mlp()
    o_eager = getattr(optim, name)(m_eager.parameters(), lr=torch.tensor(1e-2))
    o_comp = getattr(optim, name)(m_comp.parameters(), lr=torch.tensor(1e-2))
    step = torch.compile(o_comp.step)
    for k in range(8):
        for model, opt, do_step in ((m_eager, o_eager, o_eager.step), (m_comp, o_comp, step)):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            do_step()
            opt.param_groups[0]["lr"].fill_(1e-2 * 0.9 ** (k + 1))
    assert sum(counters["graph_break"].values()) == 1
    assert counters["stats"]["unique_graphs"] == 1
    (stepper,) = o_comp._flat_steps.steppers.values()
    assert stepper.flat
    first = next(m_comp.parameters())
    flat = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(stepper.state)}
    assert first.untyped_storage().data_ptr() == stepper._step_params[0].untyped_storage().data_ptr()
    assert o_comp.state[first]["exp_avg"].untyped_storage().data_ptr() in flat
    for a, b in zip(m_comp.parameters(), m_eager.parameters()):
        assert _rel(a, b) < 1e-5
    for p, q in zip(m_comp.parameters(), m_eager.parameters()):
        for key, ref in o_eager.state[q].items():
            torch.testing.assert_close(o_comp.state[p][key], ref, rtol=1e-5, atol=1e-6, msg=key)


def test_torch_compile_of_dropin_step_with_fullgraph_says_why_it_cannot():
    """The eager drop-in's step hands over to compiled flat steppers outside the traced frame,
    which fullgraph=True forbids (as it forbids torch.optim's steps); the error says what to use."""
    model = _mlp()
    opt = optim.Adam_CM(model.parameters(), lr=1e-2)
    ((model(torch.randn(8, 4))) ** 2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="memopt_func.compiled"):
        torch.compile(opt.step, fullgraph=True)()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.state


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix", "SGD_C"])
def test_cuda_graph_replay_equals_eager_and_never_syncs(name):
    rule = rules.RULES[name](**CONFIGS[name])
    params = [p.cuda() for p in _params()]
    reference = [p.clone() for p in params]
    state = rule.init(reference)
    stepper = Stepper(rule, params, cuda_graph=True)
    for k in range(12):
        grads = [g.cuda() for g in _grads(k)]
        lr = 1e-3 * (1 + k)
        # the first three steps compile and capture (compiling syncs); every later one replays
        replaying = k >= 3
        assert (stepper._graph is not None) == replaying
        if replaying:
            torch.cuda.set_sync_debug_mode("error")
        try:
            stepper.step(grads, lr=lr)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        reference, state = rule.step(reference, grads, state, lr=lr)
    for a, b in zip(stepper.params, reference):
        assert _rel(a, b) < 1e-5


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, storage",
    [("AdEMAMix", dict(state_dtype=torch.bfloat16)), ("Adam_CM", dict(state_dtype=torch.int8, buffer_dtype=torch.int8))],
    ids=["AdEMAMix-bf16", "Adam_CM-int8"],
)
def test_per_tensor_compiled_dropin_steps_on_cuda_without_a_graph(name, storage):
    """Narrow state steps per tensor: the compiled drop-in takes no CUDA graph by default, and
    asking a per-tensor stepper for one is refused at construction."""
    torch.manual_seed(0)
    model = _mlp().cuda()
    twin = copy.deepcopy(model)
    opt = getattr(compiled, name)(model.parameters(), lr=1e-2, **storage)
    ref = getattr(optim, name)(twin.parameters(), lr=1e-2, **storage)
    x, y = torch.randn(32, 4, device="cuda"), torch.randn(32, 1, device="cuda")
    for _ in range(4):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert not any(s.cuda_graph for s in opt._steppers.values())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert _rel(a, b) < 1e-2  # stochastic rounding draws differ between eager and compiled
    rule = rules.RULES[name](**storage)
    with pytest.raises(ValueError, match="cuda_graph=True needs a flat stepper"):
        Stepper(rule, [p.detach().clone() for p in model.parameters()], cuda_graph=True)


@cuda
@pytest.mark.gpu
def test_eager_dropin_step_never_syncs_on_cuda():
    model = _mlp().cuda()
    opt = optim.Adam_CM(model.parameters(), lr=1e-2, critical_test=0.2)
    x, y = torch.randn(32, 4, device="cuda"), torch.randn(32, 1, device="cuda")
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("change", [dict(momentum=0.9), dict(topC=1)])
def test_compiled_dropin_refuses_a_layout_change_in_any_group_before_any_group_moves(change):
    """A structural hyperparameter changed after the state exists (a momentum set from 0, topC)
    in the second param group raises naming it, old and new value, before the first group
    steps: every parameter and all state stay as they were."""
    model = _mlp()
    opt = compiled.SGD_C(
        [{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias]}],
        lr=1e-2, momentum=0.0, topC=2,
    )
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    opt.param_groups[1].update(change)
    before = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    (name, value), = change.items()
    with pytest.raises(ValueError, match=rf"param group 1: changed '{name}' from .* to {value} after its state was made"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p in model.parameters():
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())
