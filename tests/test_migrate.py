"""memopt_func.migrate: a run started with the published optimizers continues here.

The published packages are not on the package index; tests/published_layout.py re-implements
their state layouts (and their steps, to continue the published run for comparison).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import memopt_func
from memopt_func import checkpoint
from helpers import batches, mlp
from memopt_func.migrate import (
    BUFFER_ENTRY,
    PublishedBuffer,
    convert_published,
    load_published,
    read_published,
)
from published_layout import PUBLISHED, pickled_as_cmoptimizer

K, M = 8, 8  # published steps before the checkpoint (buffers full and replacing), steps after

VARIANTS = [
    ("Adam_C", dict(lr=1e-2, topC=3, weight_decay=0.01, amsgrad=True)),
    ("Adam_C", dict(lr=1e-2, topC=3, synced=False)),
    ("Adam_CM", dict(lr=1e-2, topC=3, weight_decay=0.01)),
    ("Adam_CM", dict(lr=1e-2, topC=2, amsgrad=True, synced=False)),
    ("RMSprop_C", dict(lr=1e-3, topC=3, momentum=0.5, centered=True, weight_decay=0.01)),
    ("RMSprop_C", dict(lr=1e-3, topC=3, synced=False)),
    ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD_C", dict(lr=1e-2, topC=3, synced=False, decay=0.9)),
    ("SGD_C", dict(lr=1e-2, topC=0, decay=0.0, momentum=0.9)),  # theirs: an empty buffer each step
    ("AdEMAMix", dict(lr=1e-2, weight_decay=0.01)),
    ("AdEMAMix", dict(lr=1e-2, alpha_warmup=12, beta3_warmup=14)),  # warmups span the checkpoint
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.999))),  # no fast EMA
    ("AdEMAMix", dict(lr=1e-2, alpha=0.0)),  # AdamW reduction: the slow EMA is dropped
    ("AdEMAMix", dict(lr=1e-2, alpha=0.0, betas=(0.0, 0.999, 0.9999))),  # AdamW reduction, no fast EMA
]


def _id(v):
    name, kw = v
    return name + "-" + ",".join(f"{k}={val}" for k, val in kw.items())


def _ours(name):
    return getattr(memopt_func, name)


def _train(model, opt, steps, start=0):
    data = batches(start + steps)[start:]
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _params(model, extra=()):
    return [p for p in model.parameters()] + list(extra)


def _published_checkpoint(name, kwargs, steps=K, extra=False):
    """A model and the published-style optimizer after ``steps`` steps, with a deep copy of
    both saved as the published code saves them. ``extra`` adds a parameter that never has a
    gradient (the published state then has no entry for it)."""
    model = mlp()
    unused = [nn.Parameter(torch.ones(2, dtype=torch.float64))] if extra else []
    opt = PUBLISHED[name](_params(model, unused), **kwargs)
    _train(model, opt, steps)
    return model, unused, opt, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("extra", [False, True], ids=["", "unused-param"])
def test_continues_the_published_run(variant, extra):
    """Loading the published checkpoint here and going on gives the parameters the published run
    reaches (float64: to rounding; the buffer mean is summed afresh here, a running sum there)."""
    name, kwargs = variant
    model, unused, pub, model_sd, opt_sd = _published_checkpoint(name, kwargs, extra=extra)
    assert unused == [] or pub.state[unused[0]] == {}
    ours_model = mlp()
    ours_model.load_state_dict(model_sd)
    ours_unused = [nn.Parameter(u.detach().clone()) for u in unused]
    ours = _ours(name)(_params(ours_model, ours_unused))  # constructor values: the loaded groups win
    load_published(ours, opt_sd)
    _train(model, pub, M, start=K)
    _train(ours_model, ours, M, start=K)
    for (n, a), b in zip(model.named_parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    for a, b in zip(unused, ours_unused):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_state_is_carried_over_faithfully(variant):
    """Slots, priorities, filled count, moments and step counts are the published ones; buf_sum
    is the sum of the filled slots; the counters start at the filled count; and the state is
    what this package's own run from the same start holds after the same steps."""
    name, kwargs = variant
    opt_sd = _published_checkpoint(name, kwargs)[4]
    model = mlp()
    ours = _ours(name)(model.parameters())
    load_published(ours, opt_sd)
    params = list(model.parameters())
    synced = kwargs.get("synced", True)
    for i, (p, theirs) in enumerate(zip(params, (opt_sd["state"][j] for j in range(len(params))))):
        mine = ours.state[p]
        assert mine["step"].dtype == torch.float64
        if "step" in theirs:
            assert mine["step"].item() == theirs["step"] == K
        for key, src in [("exp_avg", "exp_avg"), ("exp_avg", "exp_avg_fast"), ("exp_avg_sq", "exp_avg_sq"),
                         ("max_exp_avg_sq", "max_exp_avg_sq"), ("exp_avg_slow", "exp_avg_slow"),
                         ("square_avg", "square_avg"), ("grad_avg", "grad_avg"), ("momentum_buffer", "momentum_buffer")]:
            if isinstance(theirs.get(src), torch.Tensor) and key in mine:
                assert torch.equal(mine[key], theirs[src]), key
        if BUFFER_ENTRY not in theirs or theirs[BUFFER_ENTRY].curr_k == 0:
            assert not any(k.startswith("critical_") for k in mine)
            continue
        buf = theirs[BUFFER_ENTRY]
        assert torch.equal(mine["critical_buf"], buf._heap)
        filled = buf._heap[: buf.curr_k].sum(0)
        torch.testing.assert_close(mine["critical_buf_sum"], filled, rtol=0, atol=0)
        torch.testing.assert_close(mine["critical_buf_sum"], buf.aggr_sum, rtol=1e-12, atol=1e-14)
        if name == "SGD_C":
            assert mine["step"].item() == buf.curr_k
        if synced and i > 0:
            assert "critical_keys" not in mine
            continue
        shape = (1,) if synced else ()
        assert mine["critical_keys"].shape == (*shape, buf.k)
        assert torch.equal(mine["critical_keys"].reshape(-1), buf._heap_key.to(mine["critical_keys"].dtype))
        for counter, value in [("count", buf.curr_k), ("offers", buf.curr_k), ("accepted", buf.curr_k), ("nonfinite", 0)]:
            t = mine[f"critical_{counter}"]
            assert t.shape == shape and t.dtype == torch.int64 and int(t.reshape(-1)[0]) == value, counter
    stats = ours.get_offline_stats()
    assert (stats["yes"], stats["no"]) == (0, 0)

    # the same start stepped here holds the same state (but the counters the published run does
    # not keep, and the AdamW reduction's exp_avg with beta1 == 0, which the next step overwrites)
    no_fast = name == "AdEMAMix" and kwargs.get("alpha") == 0 and kwargs.get("betas", (1,))[0] == 0
    own_model = mlp()
    own = _ours(name)(own_model.parameters(), **kwargs)
    _train(own_model, own, K)
    for p, q in zip(params, own_model.parameters()):
        for key, value in own.state[q].items():
            if key in ("critical_offers", "critical_accepted") or (name == "SGD_C" and key == "step") or (no_fast and key == "exp_avg"):
                continue
            torch.testing.assert_close(ours.state[p][key], value, rtol=1e-9, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


def test_param_groups_keep_the_published_values_and_take_ours_for_the_rest():
    model = mlp()
    pub = PUBLISHED["SGD_C"](
        [{"params": list(model.parameters())[:2], "lr": 0.05, "name": "first"}, {"params": list(model.parameters())[2:]}],
        lr=1e-2, topC=3, momentum=0.9,
    )
    _train(model, pub, 4)
    sd = copy.deepcopy(pub.state_dict())
    ours = memopt_func.SGD_C(
        [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}], topC=7, seed=5, maximize=False
    )
    converted = convert_published(sd, ours)
    assert converted["memopt_func"] == {"rule": "SGD_C", "format": checkpoint.FORMAT}
    load_published(ours, sd)
    g0, g1 = ours.param_groups
    assert (g0["lr"], g0["name"], g1["lr"]) == (0.05, "first", 1e-2)
    assert g0["topC"] == g1["topC"] == 3  # the published run's, as any load_state_dict
    assert g0["seed"] == 5 and g0["aggr"] == "sum"  # no published key: the constructor's value
    assert "gradHist" not in g0
    saved = ours.state_dict()  # and the result is an ordinary state_dict of ours
    again = memopt_func.SGD_C([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    again.load_state_dict(saved)
    assert again.param_groups[0]["name"] == "first"


def test_rmsprop_c_groups_take_critical_test_from_the_optimizer():
    _, _, _, _, sd = _published_checkpoint("RMSprop_C", dict(lr=1e-3, topC=3))
    assert "critical_test" not in sd["param_groups"][0]
    ours = memopt_func.RMSprop_C(mlp().parameters())
    load_published(ours, sd)
    assert ours.param_groups[0]["critical_test"] == 0.0 and ours.param_groups[0]["aggr"] == "buffer"


def test_buffer_dtype_slots_keep_their_dtype_and_buf_sum_the_parameters():
    kwargs = dict(lr=1e-2, topC=3, buffer_dtype=torch.float32)
    model, _, pub, model_sd, sd = _published_checkpoint("Adam_C", kwargs)
    ours_model = mlp()
    ours_model.load_state_dict(model_sd)
    ours = memopt_func.Adam_C(ours_model.parameters())
    load_published(ours, sd)
    p = next(ours_model.parameters())
    assert ours.state[p]["critical_buf"].dtype == torch.float32
    assert ours.state[p]["critical_buf_sum"].dtype == torch.float64
    _train(model, pub, M, start=K)
    _train(ours_model, ours, M, start=K)
    for a, b in zip(model.parameters(), ours_model.parameters()):
        # theirs sums in float32 (a running sum), ours in float64 from the float32 slots
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_reads_a_saved_cmoptimizer_checkpoint_without_the_package(monkeypatch):
    model, _, pub, model_sd, sd = _published_checkpoint("Adam_CM", dict(lr=1e-2, topC=3))
    f = pickled_as_cmoptimizer(sd, monkeypatch)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(f, weights_only=True)  # what read_published is for
    f.seek(0)
    ckpt = read_published(f)
    assert ckpt["epoch"] == 3
    buf = ckpt["optimizer"]["state"][0][BUFFER_ENTRY]
    assert isinstance(buf, PublishedBuffer) and len(buf) == 0 and buf.curr_k == 3
    ours_model = mlp()
    ours_model.load_state_dict(model_sd)
    ours = memopt_func.Adam_CM(ours_model.parameters())
    load_published(ours, ckpt["optimizer"])
    _train(model, pub, M, start=K)
    _train(ours_model, ours, M, start=K)
    for a, b in zip(model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_buffer_given_as_a_mapping_of_its_attributes():
    _, _, _, _, sd = _published_checkpoint("Adam_C", dict(lr=1e-2, topC=3))
    for entry in sd["state"].values():
        entry[BUFFER_ENTRY] = dict(vars(entry[BUFFER_ENTRY]))
    ours = memopt_func.Adam_C(mlp().parameters())
    load_published(ours, sd)
    assert int(ours.state[next(iter(ours.state))]["critical_count"][0]) == 3


def test_ademamix_reference_checkpoint_reads_and_loads():
    _, _, _, _, sd = _published_checkpoint("AdEMAMix", dict(lr=1e-2))
    f = io.BytesIO()
    torch.save(sd, f)
    f.seek(0)
    ours = memopt_func.AdEMAMix(mlp().parameters())
    load_published(ours, read_published(f))
    p = next(iter(ours.state))
    assert set(ours.state[p]) == {"step", "exp_avg", "exp_avg_slow", "exp_avg_sq"}


# --- what does not fit ---------------------------------------------------------------------------


def _sd(name="Adam_C", **kwargs):
    kwargs = {"lr": 1e-2, "topC": 3, **kwargs} if name != "AdEMAMix" else {"lr": 1e-2, **kwargs}
    return _published_checkpoint(name, kwargs)[4]


def _refused(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        load_published(opt, sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        for key, v in before["state"][k].items():
            assert torch.equal(v, after["state"][k][key])


def _stepped(name, **kwargs):
    model = mlp()
    opt = _ours(name)(model.parameters(), **kwargs)
    _train(model, opt, 2)
    return opt


@pytest.mark.parametrize(
    "saved, target, match",
    [
        ("AdEMAMix", "Adam_C", r"lacks \['amsgrad', 'kappa', 'topC', 'decay', 'critical_test', 'synced', 'buffer_dtype'\]"),
        ("Adam_C", "AdEMAMix", r"lacks \['alpha', 'beta3_warmup', 'alpha_warmup'\]"),
        ("Adam_C", "RMSprop_C", r"lacks \['momentum', 'alpha', 'centered'\].*published RMSprop_C"),
        ("RMSprop_C", "SGD_C", r"lacks \['dampening', 'critical_test'\]"),
        ("SGD_C", "Adam_CM", r"lacks \['betas', 'eps', 'amsgrad'\]"),
    ],
)
def test_another_class_layout_is_refused(saved, target, match):
    _refused(_stepped(target), _sd(saved), match)


def test_our_own_state_dict_is_refused():
    opt = _stepped("Adam_C")
    with pytest.raises(ValueError, match="saved by memopt_func's Adam_C.*optimizer.load_state_dict"):
        load_published(opt, opt.state_dict())


def test_not_our_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="memopt_func optimizer"):
        load_published(torch.optim.Adam(mlp().parameters()), _sd())


def test_buffer_slots_must_match_the_groups_topc():
    sd = _sd("Adam_CM")
    sd["param_groups"][0]["topC"] = 4
    _refused(_stepped("Adam_CM"), sd, r"its buffer has 3 slots; the group's topC is 4")


def test_topc_zero_group_with_a_filled_buffer_is_refused():
    sd = _sd("SGD_C")
    sd["param_groups"][0]["topC"] = 0
    _refused(_stepped("SGD_C"), sd, r"holds a filled 'critical gradients' buffer, but the group has kappa=0 or topC=0")


def test_group_and_parameter_counts_must_match():
    sd = _sd()
    model = mlp()
    two = memopt_func.Adam_C([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    _refused(two, sd, r"has 1 param group\(s\), Adam_C has 2")
    fewer = memopt_func.Adam_C(list(mlp().parameters())[:3])
    _refused(fewer, sd, r"has 4 parameters; the optimizer's group 0 has 3")


def test_parameter_shapes_must_match():
    sd = _sd()
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    _refused(memopt_func.Adam_C(other.parameters()), sd, r"parameter 0: 'exp_avg' is \(8, 4\); the parameter's shape is \(5, 4\)")


def test_synced_buffers_that_diverged_are_refused():
    """Published synced buffers are per parameter: a parameter that missed a step keeps other
    priorities than the rest, which one shared row cannot hold."""
    model = mlp()
    pub = PUBLISHED["Adam_C"](model.parameters(), lr=1e-2, topC=3)
    _train(model, pub, 3)
    x, y = batches(4)[3]
    pub.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    list(model.parameters())[1].grad = None
    pub.step()
    sd = copy.deepcopy(pub.state_dict())
    _refused(_stepped("Adam_C"), sd, r"synced, but the published buffers of parameters 0 and 1 hold different")
    # the same run per tensor is fine
    sd["param_groups"][0]["synced"] = False
    load_published(memopt_func.Adam_C(mlp().parameters()), sd)


def test_non_finite_priorities_are_refused():
    sd = _sd()
    sd["state"][2][BUFFER_ENTRY]._heap_key[1] = float("nan")
    _refused(_stepped("Adam_C"), sd, r"parameter 2: its buffer holds a non-finite priority")


def test_buffer_decay_must_match_the_groups():
    sd = _sd()
    sd["param_groups"][0]["decay"] = 0.9
    _refused(_stepped("Adam_C"), sd, r"decays priorities by 0.7, the group's decay is 0.9")


def test_buffer_dtype_must_match_the_slots():
    sd = _sd()
    sd["param_groups"][0]["buffer_dtype"] = torch.float16
    _refused(_stepped("Adam_C"), sd, r"slots are torch.float64; the group's buffer_dtype needs torch.float16")


def test_invalid_published_hyperparameters_are_refused():
    sd = _sd("Adam_CM")
    sd["param_groups"][0]["decay"] = 1.5  # the published check lets it through
    _refused(_stepped("Adam_CM"), sd, r"param group 0 .*invalid decay: 1.5")


def test_missing_and_unknown_entries_are_refused():
    sd = _sd("Adam_C", amsgrad=True)
    del sd["state"][1]["max_exp_avg_sq"]
    _refused(_stepped("Adam_C", amsgrad=True), sd, r"parameter 1 lacks 'max_exp_avg_sq'")
    sd = _sd("Adam_C")
    sd["state"][0]["momentum_buffer"] = torch.zeros(8, 4, dtype=torch.float64)
    _refused(_stepped("Adam_C"), sd, r"parameter 0 holds \['momentum_buffer'\], which the published Adam_C does not keep")
    sd = _sd("Adam_C")
    del sd["state"][3][BUFFER_ENTRY]
    _refused(_stepped("Adam_C"), sd, r"parameter 3 has no 'critical gradients' buffer")
    sd = _sd("Adam_C")
    sd["state"][0][BUFFER_ENTRY] = torch.zeros(3)
    _refused(_stepped("Adam_C"), sd, r"'critical gradients' is a Tensor, not the published TensorList")
    sd = _sd("AdEMAMix")
    sd["state"][0]["step"] = "seven"
    _refused(_stepped("AdEMAMix"), sd, r"parameter 0: 'step' is 'seven'")
    sd = _sd("AdEMAMix", betas=(0.0, 0.999, 0.9999))
    sd["param_groups"][0]["betas"] = (0.9, 0.999, 0.9999)
    _refused(_stepped("AdEMAMix"), sd, r"parameter 0 lacks 'exp_avg_fast'")


def test_complex_parameters_are_refused():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = memopt_func.Adam_C([p])
    sd = {"state": {}, "param_groups": [{**{k: v for k, v in opt.defaults.items()}, "params": [0]}]}
    with pytest.raises(ValueError, match="complex parameters are not migrated"):
        load_published(opt, sd)


def test_a_state_dict_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        load_published(memopt_func.Adam_C(mlp().parameters()), {"param_groups": []})


def test_compiled_drop_in_takes_the_same_state():
    """The compiled drop-ins load through the same load_state_dict (no compiled step here)."""
    from memopt_func import compiled

    sd = _sd("Adam_CM")
    eager, comp = memopt_func.Adam_CM(mlp().parameters()), compiled.Adam_CM(mlp().parameters())
    load_published(eager, sd)
    load_published(comp, sd)
    for p, q in zip(eager.param_groups[0]["params"], comp.param_groups[0]["params"]):
        assert eager.state[p].keys() == comp.state[q].keys()
        for key in eager.state[p]:
            assert torch.equal(eager.state[p][key], comp.state[q][key])


def test_an_unfilled_published_slot_is_never_read():
    """SPEC: unfilled slots are never read. A published buffer with 2 of 3 slots filled whose third
    slot holds garbage converts to the same buf_sum as with zeros there."""
    _, _, _, _, sd = _published_checkpoint("Adam_C", dict(lr=1e-2, topC=3), steps=2)
    buf = sd["state"][0][BUFFER_ENTRY]
    assert buf.curr_k == 2
    clean = convert_published(sd, memopt_func.Adam_C(mlp().parameters(), topC=3))
    buf._heap[2] = 123.0
    dirty = convert_published(sd, memopt_func.Adam_C(mlp().parameters(), topC=3))
    assert torch.equal(clean["state"][0]["critical_buf_sum"], dirty["state"][0]["critical_buf_sum"])
