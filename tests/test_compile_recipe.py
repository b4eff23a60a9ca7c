"""PyTorch's own recipe, ``step = torch.compile(opt.step)`` with an LR scheduler, works for the
drop-ins as well as for ``torch.optim.AdamW``: no more graphs and no more graph breaks than AdamW
makes in the same setup, and the numbers of the eager drop-in, the scheduler's lr taking effect
at every step.

Setups: a float lr that ``LambdaLR`` changes every step (Dynamo makes the float symbolic after
its first change) down to 0, and a tensor lr that ``OneCycleLR`` fills in place.

Dynamo decides the graphs and the breaks (AOT Autograd's pass that turns symbolic floats into
graph inputs included); Inductor only compiles each graph it is given. So the count test runs
every drop-in with ``backend="aot_eager"``, which counts what the default backend counts at a
fraction of the compile time, and one drop-in runs the float setup through Inductor itself.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from memopt_func import optim

STEPS = 8
TOL = 1e-5

# Beside the defaults: 8-bit buffer slots (a dtype among the settings, codes and scales written in
# place) and per-tensor buffers (a key row per parameter).
DROPINS = {
    "Adam_CM": dict(weight_decay=0.01),
    "Adam_C": dict(weight_decay=0.01, buffer_dtype=torch.int8),
    "RMSprop_C": dict(weight_decay=0.01, momentum=0.5),
    "SGD_C": dict(weight_decay=0.01, momentum=0.9, synced=False),
    "AdEMAMix": dict(weight_decay=0.01),
}


def _float_lambda_lr(opt):
    # a new lr every step, down to exactly 0 for the last one (as a cosine schedule ends)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (STEPS - 1 - k) / (STEPS - 1))


def _tensor_one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS + 2, cycle_momentum=False)


SETUPS = {
    "float-lr-LambdaLR": (lambda: 1e-2, _float_lambda_lr),
    "tensor-lr-OneCycleLR": (lambda: torch.tensor(1e-2), _tensor_one_cycle),
}


def _run(make_opt, setup, backend=None):
    """STEPS steps of a tiny MLP under the setup's scheduler, through ``torch.compile(opt.step)``
    with the backend (eager without one); returns the model, the optimizer and what Dynamo made:
    (graphs, graph breaks, the kinds of break)."""
    lr, scheduler = SETUPS[setup]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False))
    opt = make_opt(model.parameters(), lr())
    sched = scheduler(opt)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    torch._dynamo.reset()
    counters.clear()
    step = opt.step if backend is None else torch.compile(opt.step, backend=backend)
    try:
        for _ in range(STEPS):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            step()
            sched.step()
        breaks = counters["graph_break"]
        made = (counters["stats"]["unique_graphs"], sum(breaks.values()), {r.split("\n")[0] for r in breaks})
    finally:
        torch._dynamo.reset()
    return model, opt, made


# What Dynamo calls the frame it does not trace: the drop-in's ``step``, which hands the work to
# compiled flat steppers (``MemoryOptimizer._steps_flat``), called from a traced frame or not.
HANDOVER = {"Skip inlining `torch.compiler.disable()`d function", "Skip calling `torch.compiler.disable()`d function"}

_ADAMW: dict[str, tuple[int, int, set[str]]] = {}


def _adamw_counts(setup):
    """What Dynamo makes of torch.optim.AdamW under the setup (see ``_run``), measured once per setup."""
    if setup not in _ADAMW:
        _ADAMW[setup] = _run(lambda p, lr: torch.optim.AdamW(p, lr=lr), setup, "aot_eager")[2]
    return _ADAMW[setup]


def _check(name, setup, backend):
    def make(params, lr):
        return getattr(optim, name)(params, lr=lr, **DROPINS[name])

    model, opt, (graphs, breaks, kinds) = _run(make, setup, backend)
    ref_model, ref_opt, _ = _run(make, setup)
    adamw_graphs, adamw_breaks, adamw_kinds = _adamw_counts(setup)
    assert 1 <= graphs <= adamw_graphs, f"{name}: {graphs} graphs, AdamW {adamw_graphs}"
    assert breaks <= adamw_breaks, f"{name}: {breaks} graph breaks, AdamW {adamw_breaks}"
    # a break of a kind AdamW has not (a frame falling back to eager) fails even within the count;
    # the one the drop-in adds is its step handing over to its flat steppers, which compiled the
    # step (the graphs counted above are theirs)
    assert kinds <= adamw_kinds | HANDOVER, f"{name}: graph breaks {kinds - adamw_kinds - HANDOVER}"
    assert "_flat_steps" in opt.__dict__ and opt._flat_steps.steppers
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=TOL, atol=TOL * 1e-2)
        state, ref_state = opt.state[p], ref_opt.state[q]
        assert state.keys() == ref_state.keys()
        for key in ref_state:
            scale = ref_state[key].abs().max().item() if ref_state[key].is_floating_point() else 0
            torch.testing.assert_close(state[key], ref_state[key], rtol=TOL, atol=TOL * scale, msg=f"{name} {key}")
    assert int(opt.state[next(model.parameters())]["step"]) == STEPS


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("name", list(DROPINS))
def test_recipe_compiles_no_worse_than_adamw_and_matches_eager(name, setup):
    _check(name, setup, "aot_eager")


def test_recipe_through_inductor():
    _check("Adam_CM", "float-lr-LambdaLR", "inductor")


def test_recipe_refuses_a_momentum_set_from_zero_with_a_clear_error():
    """Under torch.compile(opt.step) a momentum set from 0 after the state exists (no momentum
    buffer) raises as in eager: a ValueError naming it, old and new value, changing nothing."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = optim.SGD_C([p], lr=0.1, momentum=0.0)
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(2):
        p.grad = torch.randn(10)
        step()
    opt.param_groups[0]["momentum"] = 0.9
    p.grad = torch.randn(10)
    before = p.detach().clone()
    state = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"param group 0: changed 'momentum' from 0.0 to 0.9 after its state was made"):
        step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_recipe_refuses_a_structural_change_and_applies_a_neutral_one_like_eager(dtype):
    """Under torch.compile(opt.step) a static hyperparameter changed after the state exists is
    checked as in eager: topC (a layout change) raises naming it, old and new value, changing
    nothing; kappa (same layout) applies from that step on, the same numbers as eager. Both
    through the flat steppers (float32) and traced tensor by tensor (complex parameters)."""

    def run(compiled_step):
        torch._dynamo.reset()
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(10, dtype=dtype))
        opt = optim.Adam_CM([p], lr=0.1, topC=3)
        step = torch.compile(opt.step, backend="aot_eager") if compiled_step else opt.step
        for k in range(4):
            p.grad = torch.randn(10, dtype=dtype)
            if k == 2:
                opt.param_groups[0]["kappa"] = 0.5
            step()
        opt.param_groups[0]["topC"] = 2
        p.grad = torch.randn(10, dtype=dtype)
        before = p.detach().clone()
        state = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match=r"changed 'topC' from 3 to 2 after its state was made"):
            step()
        assert torch.equal(p.detach(), before)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
        return before

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)  # aot_eager rounds differently


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)


def _backward(model, opt, x, y):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def _assert_same_run(model, opt, ref_model, ref_opt):
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=TOL, atol=TOL * 1e-2)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, ref in ref_opt.state[q].items():
            scale = ref.abs().max().item() if ref.is_floating_point() else 0
            torch.testing.assert_close(opt.state[p][key], ref, rtol=TOL, atol=TOL * scale, msg=key)


def test_recipe_then_plain_calls_then_a_checkpoint_continue_the_eager_run():
    """Steps under torch.compile(opt.step), then plain ``opt.step()`` calls (which keep to the flat
    steppers, so nothing is stale), then a state_dict loaded into a fresh eager optimizer and
    into the compiled one (whose next step adopts it): every part is the all-eager run."""
    torch._dynamo.reset()
    model, x, y = _model_and_data()
    ref_model, _, _ = _model_and_data()
    opt = optim.Adam_CM(model.parameters(), lr=1e-2, topC=3, weight_decay=0.01)
    ref_opt = optim.Adam_CM(ref_model.parameters(), lr=1e-2, topC=3, weight_decay=0.01)
    step = torch.compile(opt.step)
    for k in range(9):
        for m, o, s in ((model, opt, step if k < 3 or k >= 6 else opt.step), (ref_model, ref_opt, ref_opt.step)):
            _backward(m, o, x, y)
            s()
        if k == 5:  # a checkpoint, loaded back in: the next compiled step adopts the loaded state
            _assert_same_run(model, opt, ref_model, ref_opt)
            buffer = io.BytesIO()  # as a checkpoint file holds it: the state_dict's tensors are the live ones
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer)
            assert "_flat_steps" in opt.__dict__
            opt.load_state_dict(saved)
            assert "_flat_steps" not in opt.__dict__
            fresh_model, _, _ = _model_and_data(seed=7)
            fresh_model.load_state_dict(model.state_dict())
            fresh = optim.Adam_CM(fresh_model.parameters(), lr=1e-2, topC=3, weight_decay=0.01)
            buffer.seek(0)
            fresh.load_state_dict(torch.load(buffer))  # a copy of its own: opt steps its tensors in place
    _assert_same_run(model, opt, ref_model, ref_opt)
    for _ in range(3):  # the checkpoint, stepped eagerly from step 6 on
        _backward(fresh_model, fresh, x, y)
        fresh.step()
    _assert_same_run(fresh_model, fresh, ref_model, ref_opt)


def test_recipe_skips_a_parameter_without_gradient_and_never_touches_a_frozen_one():
    """Under torch.compile(opt.step) a parameter whose .grad is None is skipped as torch.optim
    skips it (parameter and state untouched, its step held), and a frozen parameter is never
    stepped, as in the eager drop-in."""
    torch._dynamo.reset()
    model, x, y = _model_and_data()
    ref_model, _, _ = _model_and_data()
    for m in (model, ref_model):
        m[0].bias.requires_grad_(False)
    opt = optim.Adam_C(model.parameters(), lr=1e-2, topC=2)
    ref_opt = optim.Adam_C(ref_model.parameters(), lr=1e-2, topC=2)
    step = torch.compile(opt.step)
    frozen = model[0].bias.detach().clone()
    for k in range(5):
        for m, o, s in ((model, opt, step), (ref_model, ref_opt, ref_opt.step)):
            _backward(m, o, x, y)
            if k == 2:
                m[2].bias.grad = None
            s()
        if k == 2:
            held = int(opt.state[model[2].bias]["step"])
            assert held == int(opt.state[model[2].weight]["step"]) - 1
    assert torch.equal(model[0].bias, frozen)
    _assert_same_run(model, opt, ref_model, ref_opt)


def test_recipe_takes_a_complex_param_group_added_after_flat_steps():
    """A param group that flat steppers cannot step (complex parameters), added after steps under
    torch.compile(opt.step), sends every group back to the rule's own (traced) step, carrying on
    from the flat steppers' state: the same run as eager."""
    torch._dynamo.reset()
    model, x, y = _model_and_data()
    ref_model, _, _ = _model_and_data()
    opt = optim.Adam_CM(model.parameters(), lr=1e-2, topC=2, synced=False)
    ref_opt = optim.Adam_CM(ref_model.parameters(), lr=1e-2, topC=2, synced=False)
    step = torch.compile(opt.step, backend="aot_eager")
    z = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    ref_z = nn.Parameter(z.detach().clone())
    gen = torch.Generator().manual_seed(3)
    for k in range(5):
        if k == 2:
            opt.add_param_group({"params": [z]})
            ref_opt.add_param_group({"params": [ref_z]})
            assert "_flat_steps" in opt.__dict__
        g = torch.randn(5, dtype=torch.complex64, generator=gen)
        for m, o, s, c in ((model, opt, step, z), (ref_model, ref_opt, ref_opt.step, ref_z)):
            _backward(m, o, x, y)
            c.grad = g.clone()
            s()
    assert "_flat_steps" not in opt.__dict__
    _assert_same_run(model, opt, ref_model, ref_opt)
    torch.testing.assert_close(z, ref_z, rtol=TOL, atol=TOL * 1e-2)


def test_recipe_takes_a_param_group_added_mid_run():
    """A param group added after steps under torch.compile(opt.step) gets a flat stepper of its
    own from its first step (traced tensor by tensor, a group whose state was made during the
    trace failed when Dynamo restarted its analysis): the same run as eager."""
    torch._dynamo.reset()
    model, x, y = _model_and_data()
    ref_model, _, _ = _model_and_data()
    first, ref_first = list(model[0].parameters()), list(ref_model[0].parameters())
    opt = optim.Adam_CM(first, lr=1e-2, topC=2)
    ref_opt = optim.Adam_CM(ref_first, lr=1e-2, topC=2)
    step = torch.compile(opt.step)
    for k in range(5):
        if k == 2:
            opt.add_param_group({"params": list(model[2].parameters()), "lr": 3e-2})
            ref_opt.add_param_group({"params": list(ref_model[2].parameters()), "lr": 3e-2})
        for m, o, s in ((model, opt, step), (ref_model, ref_opt, ref_opt.step)):
            _backward(m, o, x, y)
            s()
    assert len(opt._flat_steps.steppers) == 2
    assert int(opt.state[model[2].weight]["step"]) == 3
    _assert_same_run(model, opt, ref_model, ref_opt)
