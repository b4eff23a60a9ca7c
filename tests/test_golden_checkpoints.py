"""Every checkpoint format this project ever wrote loads, and the run goes on as the version that
wrote it went on (tests/golden/: one folder per version, written by tests/golden_corpus.py)."""

from __future__ import annotations

import glob
import os

import pytest
import torch

import memopt_func.compiled as compiled
from memopt_func import optim, rules
from memopt_func.checkpoint import FORMAT
from golden_corpus import CASES, GOLDEN, SteppingLoop, initial_params, make_optimizer, make_stepper, relative_errors, run, skipping

FILES = sorted(glob.glob(os.path.join(GOLDEN, "*", "*.pt")))
IDS = [os.path.relpath(f, GOLDEN).removesuffix(".pt") for f in FILES]


def _load(path):
    return torch.load(path, weights_only=True)


def _resume(case, cls):
    params = [torch.nn.Parameter(p.clone()) for p in case["params_at_save"]]
    how = case["how"]
    if how == "stepper":
        opt = make_stepper(rules, compiled, case["class"], params, case["kwargs"])
        opt.load_state_dict(case["state_dict"])
        run(opt, params, range(case["before"], case["before"] + case["after"]), skipping(how))
        return params, opt
    # the constructor's values are today's defaults where the saved groups say nothing: a load
    # must put the saved values back (lr, topC, ...), not keep these
    opt = make_optimizer(cls, params, {"lr": 0.5}, "groups" if how == "groups" else "eager")
    opt.load_state_dict(case["state_dict"])
    run(opt, params, range(case["before"], case["before"] + case["after"]), skipping(how))
    return params, opt


def _assert_continues(case, params):
    for i, err in enumerate(relative_errors(params, case["params_after"])):
        assert err <= 1e-9, f"{case['label']}/{case['case']}: parameter {i} is {err:.3g} (relative) off the old run's continuation"


def test_the_corpus_covers_every_case_and_version():
    labels = sorted({os.path.basename(os.path.dirname(f)) for f in FILES})
    assert labels[0] == "2026-11-21-c5d6710", labels  # the format before 2026-11-30
    newest = labels[-1]
    assert {os.path.basename(f)[:-3] for f in FILES if f"/{newest}/" in f} == set(CASES)
    assert _load(os.path.join(GOLDEN, newest, "adam_cm.pt"))["state_dict"]["memopt_func"]["format"] == FORMAT, (
        "the state_dict format changed: write today's corpus (tests/golden_corpus.py) and say so in CHANGELOG.md"
    )


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_an_earlier_checkpoint_resumes_as_its_own_version_went_on(path):
    case = _load(path)
    params, opt = _resume(case, getattr(optim, case["class"]))
    _assert_continues(case, params)
    again = opt.state_dict()
    assert again["memopt_func"]["format"] == FORMAT
    for group, saved in zip(again.get("param_groups", []), case["state_dict"].get("param_groups", [])):
        assert all(group[k] == v for k, v in saved.items() if k != "params"), "a saved hyperparameter was not put back"


@pytest.mark.parametrize("path", [f for f in FILES if "/compiled-" in f], ids=[i for i in IDS if "/compiled-" in i])
def test_an_earlier_compiled_checkpoint_resumes_compiled(path):
    case = _load(path)
    params, _ = _resume(case, getattr(compiled, case["class"]))
    _assert_continues(case, params)


# The group flags torch.optim added after its first release, which PyTorch's
# ``test_can_load_older_state_dict`` deletes from a state_dict before loading it back (the default
# ``OptimizerInfo.not_og_supported_flags``, and ``fused``, which its older versions deleted too).
TORCH_LATER_FLAGS = ("foreach", "differentiable", "maximize", "capturable", "fused")
DROPINS = ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"]


def _conv_bn_steps(opt, model, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


@pytest.mark.parametrize(
    "name,kind", [(n, "eager") for n in DROPINS] + [("Adam_CM", "compiled"), ("AdEMAMix", "compiled")]
)
def test_a_state_dict_without_torchs_later_flags_loads_as_in_pytorchs_own_test(name, kind):
    """PyTorch's ``test_can_load_older_state_dict``: three steps of a Conv2d + BatchNorm model,
    the later flags deleted from the state_dict's groups, loaded back, one more step; the flags
    come back at their defaults and the loaded run equals the unbroken one."""
    cls = getattr(compiled if kind == "compiled" else optim, name)

    def model_and_input():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
        return model, torch.rand(1, 4, 16, 16)

    model, x = model_and_input()
    opt = cls(model.parameters(), lr=1e-2, maximize=False)
    _conv_bn_steps(opt, model, x, 3)
    old = torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, opt.state_dict())
    for group in old["param_groups"]:
        for flag in TORCH_LATER_FLAGS:
            group.pop(flag, None)
    twin, _ = model_and_input()
    twin.load_state_dict(model.state_dict())
    resumed = cls(twin.parameters(), lr=1e-2)
    resumed.load_state_dict(old)
    assert all(g["maximize"] is False and g["foreach"] is None and g["differentiable"] is False for g in resumed.param_groups)
    _conv_bn_steps(opt, model, x, 1)
    _conv_bn_steps(resumed, twin, x, 1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _saved(name="Adam_C"):
    params = [torch.nn.Parameter(p) for p in initial_params([(3, 2), (4,)])]
    opt = getattr(optim, name)(params, lr=1e-2)
    run(opt, params, range(3), skips=False)
    return params, opt.state_dict()


def test_a_state_dict_of_a_newer_format_is_refused_naming_both_formats():
    params, sd = _saved()
    sd["memopt_func"] = {**sd["memopt_func"], "format": FORMAT + 1}
    opt = optim.Adam_C(params, lr=0.5)
    with pytest.raises(ValueError, match=rf"newer memopt-func \(state_dict format {FORMAT + 1}; this version reads formats 0 to {FORMAT}\)"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5 and not opt.state


@pytest.mark.parametrize("bad", ["2", -1, True, 1.5])
def test_a_malformed_format_is_refused_naming_the_value(bad):
    params, sd = _saved()
    sd["memopt_func"] = {**sd["memopt_func"], "format": bad}
    with pytest.raises(ValueError, match=r"invalid state_dict\['memopt_func'\]\['format'\]: " + repr(bad).replace("(", r"\(")):
        optim.Adam_C(params).load_state_dict(sd)


def test_another_rules_state_dict_of_an_older_format_is_still_refused_naming_both():
    params, sd = _saved("Adam_CM")
    sd["memopt_func"] = {"rule": "Adam_CM"}  # format 1
    with pytest.raises(ValueError, match="saved by a Adam_CM optimizer; it cannot be loaded into Adam_C"):
        optim.Adam_C(params).load_state_dict(sd)


@pytest.mark.parametrize("key", ["topC", "kappa", "betas", "lr"])
def test_a_group_lacking_a_hyperparameter_every_format_saved_is_not_ours(key):
    """Only what later formats added takes a default: format 0 (no ``memopt_func`` entry) lacking
    ``topC`` is torch.optim.Adam's state, say, and is refused."""
    params, sd = _saved()
    del sd["memopt_func"]
    del sd["param_groups"][0][key]
    with pytest.raises(ValueError, match=rf"param group 0 of this state_dict lacks \['{key}'\]: it is not a Adam_C state_dict"):
        optim.Adam_C(params).load_state_dict(sd)


def test_torch_optims_adam_state_dict_is_refused():
    params, _ = _saved()
    adam = torch.optim.Adam(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    with pytest.raises(ValueError, match="it is not a Adam_C state_dict"):
        optim.Adam_C(params).load_state_dict(adam.state_dict())


def _keys(state_dict):
    groups = [sorted(k for k in g if k != "params") for g in state_dict.get("param_groups", [])]
    return groups, {pid: sorted(e) for pid, e in state_dict["state"].items()}


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][3] in ("eager", "groups", "stepper")])
def test_todays_state_dict_has_the_newest_corpus_keys(name):
    """A state_dict that gains or loses a key is a new format: bump ``checkpoint.FORMAT``, say what
    a load fills in, and write a new corpus folder (this test then compares with that one)."""
    newest = sorted({os.path.basename(os.path.dirname(f)) for f in FILES})[-1]
    case = _load(os.path.join(GOLDEN, newest, f"{name}.pt"))
    cls_name, kwargs, shapes, how, _ = CASES[name]
    params = [torch.nn.Parameter(p) for p in initial_params(shapes)]
    if how == "stepper":
        opt = make_stepper(rules, compiled, cls_name, params, dict(kwargs))
    else:
        opt = make_optimizer(getattr(optim, cls_name), params, dict(kwargs), how)
    run(opt, params, range(case["before"]), skipping(how))
    assert _keys(opt.state_dict()) == _keys(case["state_dict"])


def _stepper(flat=None, **kw):
    params = [torch.nn.Parameter(p) for p in initial_params([(3, 2), (4,)])]
    return params, compiled.Stepper(rules.Adam_C(lr=1e-2, topC=2, **kw), params, compile=False, flat=flat)


def _stepped(flat=None, steps=3):
    params, st = _stepper(flat)
    run(SteppingLoop(st), params, range(steps), skips=not st.flat)
    return params, st


@pytest.mark.parametrize("flat", [True, False])
def test_a_stepper_state_dict_round_trips_in_place(flat):
    _, a = _stepped(flat)
    params, b = _stepper(flat)
    live = [t.data_ptr() for t in torch.utils._pytree.tree_leaves(b.state)]
    b.load_state_dict(a.state_dict())
    assert [t.data_ptr() for t in torch.utils._pytree.tree_leaves(b.state)] == live  # written in place
    for (i, x), (j, y) in zip(a.state_dict()["state"].items(), b.state_dict()["state"].items()):
        assert i == j and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _unchanged(st):
    before = st.state_dict()
    return lambda: all(torch.equal(v, st.state_dict()["state"][i][k]) for i, e in before["state"].items() for k, v in e.items())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd["memopt_func"].update(format=FORMAT + 1), "newer memopt-func"),
        (lambda sd: sd["memopt_func"].update(rule="AdEMAMix"), "saved by a AdEMAMix optimizer; it cannot be loaded into this Stepper"),
        (lambda sd: sd["state"].pop(1), r"no entry for stepped tensor 1 \(stepped: \[0, 1\]\)"),
        (lambda sd: sd["state"][1].pop("exp_avg"), "the state_dict entry of tensor 1 has"),
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(5)), r"'exp_avg' of tensor 1 is \(5,\), this stepper keeps \(4,\)"),
        (lambda sd: sd.pop("state"), "a dict with a 'state' dict of dicts"),
        (lambda sd: sd["state"].update({1: torch.zeros(3)}), "a dict with a 'state' dict of dicts"),
    ],
)
def test_a_stepper_refuses_a_state_dict_that_does_not_fit_and_changes_nothing(edit, match):
    _, a = _stepped()
    sd = a.state_dict()
    edit(sd)
    _, b = _stepped(steps=2)
    same = _unchanged(b)
    with pytest.raises(ValueError, match=match):
        b.load_state_dict(sd)
    assert same()


def test_a_flat_stepper_refuses_tensors_that_took_different_numbers_of_steps():
    params, per_tensor = _stepper(flat=False)
    for k in range(3):  # the second tensor misses a step
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and k == 1) else torch.ones_like(p)
        per_tensor.step()
    _, flat = _stepper(flat=True)
    same = _unchanged(flat)
    with pytest.raises(ValueError, match="different numbers of steps.*flat=False"):
        flat.load_state_dict(per_tensor.state_dict())
    assert same()
    _, other = _stepper(flat=False)
    other.load_state_dict(per_tensor.state_dict())
