"""Field-ready behaviour: exact buffer sums on long runs, non-finite gradients, the skip rule on
the compiled path, frozen tensors, meta-device models (SPEC.md, "Exact buffer sums", "Non-finite
gradients"; torch.optim's rule that a tensor without a gradient is left untouched)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memopt_func import compiled, optim, rules
from memopt_func.compiled import Stepper

CRITICAL = ("Adam_C", "Adam_CM", "RMSprop_C", "SGD_C")
DROPINS = CRITICAL + ("AdEMAMix",)


def _slot_sum_error(crit) -> float:
    """max over leaves of |buf_sum - sum of filled slots| / sum |filled slots| (slots summed in float64)."""
    worst = 0.0
    for i, (buf, total) in enumerate(zip(crit.buf, crit.buf_sum)):
        filled = int(crit.count[0 if crit.count.shape[0] == 1 else i])
        slots = buf[:filled].to(torch.float64)
        err = (total.to(torch.float64) - slots.sum(0)).abs().max().item()
        worst = max(worst, err / max(slots.abs().sum(0).max().item(), 1e-300))
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_buf_sum_stays_exact_over_a_falling_scale_sweep(dtype):
    """2000 steps whose gradient scale falls from 1e2 to 1e-4: a running sum ends 15% off in
    float32 (2.7e-10 in float64); the sum of the current slots stays within a few ulps."""
    gen = torch.Generator().manual_seed(0)
    rule = rules.Adam_C(lr=1e-3, topC=5, decay=0.99)
    params = [torch.zeros(64, dtype=dtype), torch.zeros(3, 5, dtype=dtype)]
    state = rule.init(params)
    steps, worst = 2000, 0.0
    for k in range(steps):
        scale = 1e2 * 1e-6 ** (k / (steps - 1))
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype) for p in params]
        params, state = rule.step(params, grads, state, donate=True)
        if k % 50 == 49:
            worst = max(worst, _slot_sum_error(state.critical))
    assert worst <= 8 * torch.finfo(dtype).eps, f"buf_sum drifted {worst:.3e} from the slots' sum"


def test_buf_sum_exact_in_the_compiled_stepper_with_a_low_buffer_dtype():
    gen = torch.Generator().manual_seed(1)
    params = [torch.zeros(16, 16), torch.zeros(16, 16), torch.zeros(7)]
    stepper = Stepper(rules.Adam_CM(lr=1e-3, topC=3, decay=0.95, buffer_dtype=torch.bfloat16), params)
    for k in range(40):
        scale = 10.0 ** (2 - k / 8)
        stepper.step([torch.randn(p.shape, generator=gen) * scale for p in params])
    state = stepper.per_tensor_state()
    assert _slot_sum_error(state.critical) <= 8 * torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- non-finite


def _stream(k: int, shapes, gen_seed: int = 0):
    gen = torch.Generator().manual_seed(gen_seed * 1000 + k)
    scales = torch.logspace(-2, 2, len(shapes) * 40, dtype=torch.float64)[torch.randperm(len(shapes) * 40, generator=gen)]
    return [torch.randn(s, generator=gen, dtype=torch.float64) * scales[i] for i, s in enumerate(shapes)]


def _run(rule, shapes, steps, bad: dict, none_for_buffer: bool):
    """Step a rule; ``bad`` maps (step, leaf) -> value planted in element 0 of that gradient. With
    ``none_for_buffer`` the bad tensor instead takes its base update outside the buffer: the run
    SPEC.md's non-finite policy must match for the healthy tensors."""
    params = [torch.linspace(-1, 1, math.prod(s), dtype=torch.float64).reshape(s) for s in shapes]
    state = rule.init(params)
    for k in range(steps):
        grads = _stream(k, shapes)
        for (step, leaf), value in bad.items():
            if step == k or (step == "rest" and k >= leaf[1]):
                i = leaf if step != "rest" else leaf[0]
                grads[i] = grads[i].clone()
                grads[i].view(-1)[0] = value
        if none_for_buffer:
            grads = [None if not torch.isfinite(g).all() else g for g in grads]
        params, state = rule.step(params, grads, state)
    return params, state


@pytest.mark.parametrize("name", CRITICAL)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_one_nonfinite_element_leaves_the_healthy_tensors_as_if_that_tensor_had_no_gradient(name, value):
    shapes = [(6, 4), (4,), (3, 3)]
    rule = rules.RULES[name](lr=1e-2, topC=3, decay=0.95)
    bad = {(5, 1): value}
    p_bad, s_bad = _run(rule, shapes, 30, bad, none_for_buffer=False)
    p_ref, s_ref = _run(rule, shapes, 30, {}, none_for_buffer=False)
    p_skip, s_skip = _run(rule, shapes, 30, bad, none_for_buffer=True)
    crit = s_bad.critical
    assert torch.isfinite(crit.keys).all(), "a non-finite gradient produced a non-finite key"
    assert int(crit.nonfinite.sum()) == 1
    # keys and the healthy tensors follow the run in which the bad tensor had no gradient at step 5
    assert torch.equal(crit.keys, s_skip.critical.keys) and torch.equal(crit.count, s_skip.critical.count)
    for i in (0, 2):
        assert torch.equal(p_bad[i], p_skip[i]), f"healthy tensor {i} left its clean trajectory"
        assert torch.equal(crit.buf[i], s_skip.critical.buf[i])
    assert not torch.equal(p_bad[0], p_ref[0]), "the left-out offer must matter to this stream"
    if name != "RMSprop_C":  # its default aggr="buffer" leaves the current gradient out of the update
        assert not torch.isfinite(p_bad[1]).all(), "the bad tensor's own update propagates its non-finite values"
    if name != "Adam_CM":  # Adam_CM offers the momentum, which the bad gradient poisons for good (its own state)
        assert torch.isfinite(crit.buf[1]).all(), "a non-finite value was written to a slot"


@pytest.mark.parametrize("name", CRITICAL)
def test_a_tensor_that_stays_nan_does_not_stop_the_group_buffer(name):
    shapes = [(5, 3), (3,), (4,)]
    rule = rules.RULES[name](lr=1e-2, topC=3, decay=0.95)
    bad = {("rest", (2, 4)): math.nan}
    p_bad, s_bad = _run(rule, shapes, 40, bad, none_for_buffer=False)
    p_skip, s_skip = _run(rule, shapes, 40, bad, none_for_buffer=True)
    crit = s_bad.critical
    assert torch.isfinite(crit.keys).all()
    assert int(crit.nonfinite.sum()) == 36
    assert int(crit.accepted.sum()) == int(s_skip.critical.accepted.sum()) > 5
    assert int(crit.offers.sum()) - int(crit.accepted.sum()) > 0, "the stream must also be refused sometimes"
    for i in (0, 1):
        assert torch.equal(p_bad[i], p_skip[i])


def test_nonfinite_per_tensor_rows_are_refused():
    rule = rules.Adam_C(lr=1e-2, topC=2, decay=0.9, synced=False)
    params = [torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    state = rule.init(params)
    grads = [torch.tensor([1.0, math.inf, 0.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    params, state = rule.step(params, grads, state)
    crit = state.critical
    assert crit.count.tolist() == [0, 1] and crit.nonfinite.tolist() == [1, 0] and crit.accepted.tolist() == [0, 1]
    assert torch.isfinite(crit.keys).all()


def test_nonfinite_in_a_flat_compiled_stepper_leaves_the_other_tensors_of_its_buffer_alone():
    """In a flat buffer the left-out tensor shares the slot with the others: only its elements
    keep their old slot values."""
    shapes = [(8, 8), (8, 8), (8, 8)]
    rule = rules.Adam_C(lr=1e-2, topC=2, decay=0.99)

    def grads(k):
        out = [g.float() for g in _stream(k, shapes)]
        if k == 3:
            out[1][0, 0] = math.inf
        return out

    def start():
        return [torch.linspace(-1, 1, 64).reshape(8, 8) + i for i in range(3)]

    ref_params, state = start(), rule.init(start())
    for k in range(8):
        ref_params, state = rule.step(ref_params, grads(k), state)
    for compiled_step in (False, True):
        stepper = Stepper(rule, start(), compile=compiled_step)
        for k in range(8):
            stepper.step(grads(k))
        params, st = stepper.params, stepper.per_tensor_state()
        assert torch.isfinite(st.critical.keys).all() and int(st.critical.nonfinite.sum()) == 1
        for i in (0, 2):
            torch.testing.assert_close(params[i], ref_params[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st.critical.buf[i], state.critical.buf[i], rtol=1e-5, atol=1e-6)
        assert torch.isfinite(st.critical.buf[1]).all()


def test_dropin_stats_count_nonfinite_offers():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = optim.Adam_C([w], lr=1e-2, topC=2)
    for v in (1.0, math.nan, 2.0):
        w.grad = torch.full((3,), v, dtype=torch.float64)
        opt.step()
    stats = opt.get_offline_stats()
    assert stats["nonfinite"] == 1 and stats["offers"] == 3 and stats["accepted"] == 2


# ----------------------------------------------------------------------------- skip rule, compiled


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _loss(model, k):
    gen = torch.Generator().manual_seed(k)
    p0 = next(model.parameters())
    x = torch.randn(16, 4, generator=gen).to(p0.dtype)
    return (model(x) ** 2).mean()


@pytest.mark.parametrize("name", DROPINS)
def test_compiled_dropin_skips_frozen_and_intermittent_tensors_like_eager(name):
    models = [_model(), _model()]
    frozen, intermittent = 2, 4  # parameter positions: layer 2's weight frozen; layer 3's weight loses its gradient
    opts = []
    for m, cls in zip(models, (getattr(optim, name), getattr(compiled, name))):
        params = list(m.parameters())
        params[frozen].requires_grad_(False)
        opts.append(cls(m.parameters(), lr=1e-2, weight_decay=0.1) if name != "SGD_C" else cls(m.parameters(), lr=1e-2, weight_decay=0.1))
    start = [[p.detach().clone() for p in m.parameters()] for m in models]
    for k in range(8):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            _loss(m, k).backward()
            if k >= 3:
                list(m.parameters())[intermittent].grad = None
            before = list(m.parameters())[intermittent].detach().clone()
            opt.step()
            if k >= 3:
                assert torch.equal(list(m.parameters())[intermittent], before), "a tensor without gradient moved"
    for m, s in zip(models, start):
        assert torch.equal(list(m.parameters())[frozen], s[frozen]), "a frozen tensor moved"
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sa, sb = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            torch.testing.assert_close(sa[i][key].to(sb[i][key].dtype), sb[i][key], rtol=1e-5, atol=1e-6, msg=f"{i} {key}")


def test_compiled_dropin_matches_torch_optim_when_a_gradient_goes_missing():
    """Adam_C at kappa=0 is torch.optim.Adam: the skipped tensor's step counter is held."""
    m_ours, m_torch = _model(dtype=torch.float64), _model(dtype=torch.float64)
    ours = compiled.Adam_C(m_ours.parameters(), lr=1e-2, kappa=0.0)
    ref = torch.optim.Adam(m_torch.parameters(), lr=1e-2)
    for k in range(6):
        for m, opt in ((m_ours, ours), (m_torch, ref)):
            opt.zero_grad()
            _loss(m, k).backward()
            if k in (1, 2):
                list(m.parameters())[0].grad = None
            opt.step()
    for a, b in zip(m_ours.parameters(), m_torch.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_stepper_over_named_parameters_never_changes_a_frozen_tensor():
    model = _model()
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    stepper = Stepper(rules.AdamW(lr=1e-2, weight_decay=0.5), dict(model.named_parameters()), compile=False)
    assert "2.weight" not in [n for i, n in enumerate(dict(model.named_parameters())) if i in stepper.stepped]
    for k in range(5):
        stepper.zero_grad()
        _loss(model, k).backward()
        stepper.step()
    assert torch.equal(model[2].weight, frozen)
    assert model[2].weight.grad is None
    with pytest.raises(ValueError, match="frozen"):
        grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        stepper.step(grads)


def test_flat_stepper_moves_to_per_tensor_stepping_when_a_gradient_is_missing():
    params = [torch.ones(4, 4), torch.ones(4), torch.ones(4, 4)]
    rule = rules.Adam_CM(lr=1e-2, topC=2)
    stepper = Stepper(rule, [p.clone() for p in params], compile=False)
    ref_params, ref_state = [p.clone() for p in params], rule.init(params)
    for k in range(6):
        grads = [torch.full(p.shape, float(k + 1 + i)) for i, p in enumerate(params)]
        if k in (2, 3):
            grads[1] = None
        stepper.step(grads)
        ref_params, ref_state = rule.step(ref_params, grads, ref_state)
    assert not stepper.flat
    for a, b in zip(stepper.params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert stepper.per_tensor_state().step.tolist() == [6.0, 4.0, 6.0]


def test_compiled_dropin_on_a_meta_model_steps_without_reading_values():
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    opt = compiled.Adam_CM(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())


# ----------------------------------------------------------------------------- param groups, loads


@pytest.mark.parametrize("key, value", [("topC", 3), ("synced", False), ("buffer_dtype", torch.float16), ("amsgrad", True)])
def test_structural_change_after_state_exists_raises_naming_the_key(key, value):
    model = _model()
    opt = optim.Adam_CM(model.parameters(), lr=1e-3, topC=5)
    _loss(model, 0).backward()
    opt.step()
    old = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"'{key}' from {old!r} to {value!r}".replace("(", r"\(").replace(")", r"\)")):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_non_structural_change_is_applied():
    model = _model()
    opt = optim.Adam_C(model.parameters(), lr=1e-3)
    _loss(model, 0).backward()
    opt.step()
    opt.param_groups[0]["aggr"] = "mean"
    opt.param_groups[0]["kappa"] = 0.5
    opt.step()
    assert opt.groups.rule(opt.param_groups[0]).hyper["aggr"] == "mean"


def test_a_state_dict_of_another_rule_is_refused_naming_both():
    m = _model()
    a = optim.Adam_C(m.parameters())
    _loss(m, 0).backward()
    a.step()
    b = optim.Adam_CM(m.parameters())
    with pytest.raises(ValueError, match="Adam_C.*Adam_CM"):
        b.load_state_dict(a.state_dict())
    twin = compiled.Adam_C(m.parameters())
    twin.load_state_dict(a.state_dict())  # the compiled twin keeps the same state


def _topc5_state_claiming_topc3():
    """A stepped topC=5 Adam_CM and its state_dict with the group's topC rewritten to 3."""
    m = _model()
    a = optim.Adam_CM(m.parameters(), topC=5)
    _loss(m, 0).backward()
    a.step()
    sd = a.state_dict()
    sd["param_groups"][0]["topC"] = 3
    return m, a, sd


def test_a_state_that_does_not_fit_the_rule_is_refused():
    m, _, sd = _topc5_state_claiming_topc3()
    b = optim.Adam_CM(m.parameters(), topC=3)
    with pytest.raises(ValueError, match="topC=3"):
        b.load_state_dict(sd)
    rule3, rule5 = rules.Adam_CM(topC=3), rules.Adam_CM(topC=5)
    params = [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"\(1, 5\).*\(1, 3\)"):
        rule3.step(params, [torch.ones(3)], rule5.init(params))


def test_a_refused_load_leaves_the_optimizer_as_it_was():
    m, a, sd = _topc5_state_claiming_topc3()
    before = {k: v.clone() for k, v in a.state[next(m.parameters())].items()}
    with pytest.raises(ValueError):
        a.load_state_dict(sd)
    assert a.param_groups[0]["topC"] == 5
    after = a.state[next(m.parameters())]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    a.step()


def test_torch_compile_of_step_with_a_float_lr_and_a_scheduler_runs():
    """PyTorch's recipe with a float lr that a scheduler changes: Dynamo makes the float
    symbolic after the first change, which the group checks must not trip over."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = optim.AdEMAMix(model.parameters(), lr=1e-3)
    twin = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    ref = optim.AdEMAMix(twin.parameters(), lr=1e-3)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for o in (opt, ref)]
    step = torch.compile(opt.step)
    for k in range(4):
        for m in (model, twin):
            for i, p in enumerate(m.parameters()):
                p.grad = torch.full_like(p, 0.1 * (k + 1 + i))
        step()
        ref.step()
        for s in scheds:
            s.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("synced", [True, False])
def test_compiled_stepper_keeps_the_buffer_sum_of_a_0d_parameter(synced):
    """A 0-d parameter's buf_sum is a 0-d float64 CPU tensor, whose in-place write torch.compile
    drops inside a graph; the stepper writes it after the compiled step."""
    rule = rules.Adam_C(lr=1e-3, topC=1, decay=0.0, synced=synced)
    start = [torch.tensor(0.7), torch.ones(3)]
    stepper = Stepper(rule, [p.clone() for p in start])
    ref, state = [p.clone() for p in start], rule.init(start)
    for k in range(3):
        grads = [torch.tensor(0.3 * (k + 1)), torch.full((3,), 0.1)]
        stepper.step([g.clone() for g in grads])
        ref, state = rule.step(ref, grads, state)
    got = stepper.per_tensor_state().critical.buf_sum[0]
    assert got.item() == state.critical.buf_sum[0].item() != 0
    torch.testing.assert_close(stepper.params[0], ref[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("compile", [False, True])
def test_stepper_steps_a_rule_whose_state_holds_none(compile):
    """SGD_C without momentum and with kappa=0 keeps None leaves in its state: the compiled
    step writes back only the tensors, as the eager rule computes them."""
    rule = rules.SGD_C(lr=0.1, momentum=0.0, kappa=0.0, topC=1, decay=0.0)
    start = [torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)]
    stepper = Stepper(rule, [p.clone() for p in start], compile=compile)
    ref, state = [p.clone() for p in start], rule.init(start)
    for k in range(3):
        grads = [torch.tensor(0.3 * (k + 1), dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)]
        stepper.step([g.clone() for g in grads])
        ref, state = rule.step(ref, grads, state)
    for a, b in zip(stepper.params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
