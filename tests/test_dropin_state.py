"""state_dict() / load_state_dict() of the drop-ins: torch.save + torch.load(weights_only=True),
bit-identical resumption (in this process and in a fresh one), dtype handling, and errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dropin_common import (
    CRITICAL,
    OPTIMIZERS,
    RESUME_CONFIGS,
    RESUME_CONFIGS_EXTRA,
    RESUME_STEPS,
    assert_params_equal,
    dropin,
    mlp,
    mse,
    resume_from,
    snapshot_state,
    train,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)


def _cfg_id(cfg):
    name, kwargs, k = cfg
    return f"{name}-k{k}-" + ",".join(f"{a}={getattr(v, '__name__', v)}" for a, v in kwargs.items())


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _checkpoint(name, kwargs, k):
    model = mlp()
    opt = dropin(name)(model.parameters(), **kwargs)
    train(model, opt, 0, k)
    return model, opt, {"model": model.state_dict(), "opt": opt.state_dict()}


def _check_mid_fill_or_warmup(name, kwargs, k, sd):
    """The save really is in the middle of buffer filling / of the warmups."""
    if name in CRITICAL:
        counts = [int(v["critical_count"].reshape(-1)[0]) for v in sd["state"].values() if "critical_count" in v]
        assert counts and all(c == min(k, kwargs["topC"]) for c in counts)
    warm = [w for w in (kwargs.get("beta3_warmup"), kwargs.get("alpha_warmup")) if w]
    assert all(k < w for w in warm)
    if name not in CRITICAL:
        assert warm


def test_resume_configs_cover_mid_fill_and_mid_warmup():
    mid_fill = {n for n, kw, k in RESUME_CONFIGS if n in CRITICAL and k < kw["topC"]}
    assert mid_fill == set(CRITICAL), "every critical optimizer is saved mid-fill at least once"
    assert any(n in CRITICAL and k >= kw["topC"] for n, kw, k in RESUME_CONFIGS), "and once with a full buffer"
    assert any(n == "AdEMAMix" and k < kw.get("alpha_warmup", 0) for n, kw, k in RESUME_CONFIGS)
    assert any(n == "AdEMAMix" and k < kw.get("beta3_warmup", 0) for n, kw, k in RESUME_CONFIGS)
    assert any(n == "AdEMAMix_C" and k < min(kw["topC"], kw.get("alpha_warmup", 0), kw.get("beta3_warmup", 0))
               for n, kw, k in RESUME_CONFIGS), "the combinator is saved mid-fill and mid-warmup at once"


@pytest.mark.parametrize("cfg", RESUME_CONFIGS + RESUME_CONFIGS_EXTRA, ids=[_cfg_id(c) for c in RESUME_CONFIGS + RESUME_CONFIGS_EXTRA])
def test_resume_is_bit_identical_in_process(cfg):
    name, kwargs, k = cfg
    ref_model = mlp()
    ref_opt = dropin(name)(ref_model.parameters(), **kwargs)
    train(ref_model, ref_opt, 0, RESUME_STEPS)

    _, opt, checkpoint = _checkpoint(name, kwargs, k)
    saved = _roundtrip(checkpoint)
    _check_mid_fill_or_warmup(name, kwargs, k, saved["opt"])
    model, resumed = resume_from(name, kwargs, saved, k)
    assert resumed.param_groups[0]["lr"] == kwargs["lr"], "param group hyperparameters come from the state_dict"
    assert_params_equal(list(model.parameters()), list(ref_model.parameters()), f"{name} resumed at {k}")
    ref_state, got_state = snapshot_state(ref_opt), snapshot_state(resumed)
    for i in ref_state:
        for key in ref_state[i]:
            assert got_state[i][key].dtype == ref_state[i][key].dtype, key
            assert torch.equal(got_state[i][key], ref_state[i][key]), f"param {i} state {key} differs after resuming"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_roundtrip_is_exact(name):
    """load_state_dict(state_dict()) through torch.save/torch.load(weights_only=True) reproduces every entry."""
    kwargs = dict(lr=1e-2) if name == "AdEMAMix" else dict(lr=1e-2, topC=3, synced=False, buffer_dtype=torch.bfloat16)
    _, opt, checkpoint = _checkpoint(name, kwargs, 4)
    sd = opt.state_dict()
    loaded = _roundtrip(sd)
    assert loaded["param_groups"] == sd["param_groups"]
    other = dropin(name)(mlp().parameters(), **kwargs)
    other.load_state_dict(loaded)
    sd2 = other.state_dict()
    assert sd2["param_groups"] == sd["param_groups"]
    assert sd2["state"].keys() == sd["state"].keys()
    for pid, entry in sd["state"].items():
        assert sd2["state"][pid].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.is_tensor(value), f"state_dict holds plain tensors only ({key})"
            got = sd2["state"][pid][key]
            assert got.dtype == value.dtype and torch.equal(got, value), f"{pid}/{key}"
    if name in CRITICAL:
        entry = sd["state"][0]
        for key in ("critical_count", "critical_offers", "critical_accepted"):
            assert entry[key].dtype == torch.int64
        assert entry["critical_buf"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_at_step_zero_then_continue(name):
    """An empty state (saved before any step) loads, and the run then equals a fresh one."""
    kwargs = dict(lr=1e-2) if name == "AdEMAMix" else dict(lr=1e-2, topC=3)
    ref_model = mlp()
    train(ref_model, dropin(name)(ref_model.parameters(), **kwargs), 0, 6)
    _, _, checkpoint = _checkpoint(name, kwargs, 0)
    model, _ = resume_from(name, kwargs, _roundtrip(checkpoint), 0, 6)
    assert_params_equal(list(model.parameters()), list(ref_model.parameters()), name)


_FRESH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, sys.argv[1])
    import dropin_common as C

    work = sys.argv[2]
    for i, (name, kwargs, k) in enumerate(C.RESUME_CONFIGS):
        checkpoint = torch.load(f"{work}/ckpt_{i}.pt", weights_only=True)
        model, opt = C.resume_from(name, kwargs, checkpoint, k)
        torch.save([p.detach().clone() for p in model.parameters()], f"{work}/final_{i}.pt")
        torch.save(opt.state_dict(), f"{work}/state_{i}.pt")
    print("resumed", len(C.RESUME_CONFIGS), "with", C.dropin("Adam_CM").__module__, sys.modules["memopt_func"].__file__)
    """
)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Save at step k here, resume in a new Python process, compare its final params and state bit for bit."""
    refs = []
    for i, (name, kwargs, k) in enumerate(RESUME_CONFIGS):
        _, _, checkpoint = _checkpoint(name, kwargs, k)
        torch.save(checkpoint, tmp_path / f"ckpt_{i}.pt")
        ref_model = mlp()
        ref_opt = dropin(name)(ref_model.parameters(), **kwargs)
        train(ref_model, ref_opt, 0, RESUME_STEPS)
        refs.append(([p.detach().clone() for p in ref_model.parameters()], ref_opt.state_dict()))
    script = tmp_path / "resume.py"
    script.write_text(_FRESH_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), TESTS_DIR, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 0, f"resume process failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"resumed {len(RESUME_CONFIGS)}" in proc.stdout
    assert os.path.join(REPO, "memopt_func") in proc.stdout, f"the fresh process used another memopt_func: {proc.stdout}"
    failures = []
    for i, (name, kwargs, k) in enumerate(RESUME_CONFIGS):
        final = torch.load(tmp_path / f"final_{i}.pt", weights_only=True)
        state = torch.load(tmp_path / f"state_{i}.pt", weights_only=True)
        ref_params, ref_sd = refs[i]
        for j, (a, b) in enumerate(zip(final, ref_params)):
            if not (a.dtype == b.dtype and torch.equal(a, b)):
                failures.append(f"{name}{kwargs} k={k}: param {j} differs")
        for pid, entry in ref_sd["state"].items():
            for key, value in entry.items():
                if not torch.equal(state["state"][pid][key], value):
                    failures.append(f"{name}{kwargs} k={k}: state {pid}/{key} differs")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", CRITICAL)
def test_load_float64_state_into_float32_params(name):
    """Moments are cast to the param dtype; integer counters stay int64; buffer_dtype buffers keep theirs."""
    for buffer_dtype, want_buf in ((None, torch.float32), (torch.float16, torch.float16)):
        kwargs = dict(lr=1e-2, topC=3, buffer_dtype=buffer_dtype, amsgrad=True) if name.startswith("Adam") else dict(
            lr=1e-2, topC=3, buffer_dtype=buffer_dtype
        )
        _, opt64, _ = _checkpoint(name, kwargs, 5)
        sd = _roundtrip(opt64.state_dict())
        model32 = mlp(dtype=torch.float32)
        opt32 = dropin(name)(model32.parameters(), **kwargs)
        opt32.load_state_dict(sd)
        params = list(model32.parameters())
        for i, p in enumerate(params):
            st = opt32.state[p]
            for key, value in st.items():
                if key in ("critical_count", "critical_offers", "critical_accepted", "critical_nonfinite"):
                    assert value.dtype == torch.int64, f"{key} became {value.dtype}"
                elif key == "critical_buf":
                    assert value.dtype == want_buf, f"critical_buf is {value.dtype}, want {want_buf}"
                elif key == "step":
                    assert value.dtype == sd["state"][i]["step"].dtype, "step counters keep their dtype"
                elif key == "critical_buf_sum":
                    assert value.dtype == torch.float64, "buf_sum is kept in float64"
                else:
                    assert value.dtype == torch.float32, f"{key} is {value.dtype}"
                # values survive the cast (to float32 rounding)
                ref = sd["state"][i][key]
                assert torch.allclose(value.double(), ref.double(), rtol=1e-3, atol=1e-6), key
        assert opt32.state[params[0]]["critical_count"].tolist() == [3]
        # and the float32 run goes on, keeping those dtypes
        train(model32, opt32, 5, 8)
        st = opt32.state[params[0]]
        assert st["critical_buf"].dtype == want_buf and st["critical_count"].dtype == torch.int64
        for key, value in st.items():
            if value.is_floating_point() and key not in ("step", "critical_buf", "critical_keys"):
                want = torch.float64 if key == "critical_buf_sum" else torch.float32
                assert value.dtype == want, f"{key} is {value.dtype}, want {want}"
        assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", ["AdEMAMix", "AdEMAMix_C"])
def test_load_float64_ademamix_state_into_float32_params(name):
    _, opt64, _ = _checkpoint(name, dict(lr=1e-2), 3)
    model32 = mlp(dtype=torch.float32)
    opt32 = dropin(name)(model32.parameters(), lr=1e-2)
    opt32.load_state_dict(_roundtrip(opt64.state_dict()))
    for p in model32.parameters():
        for key in ("exp_avg", "exp_avg_slow", "exp_avg_sq"):
            assert opt32.state[p][key].dtype == torch.float32
    train(model32, opt32, 3, 5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_load_state_dict_with_wrong_groups_or_params_raises(name):
    kwargs = dict(lr=1e-2)
    model = mlp()
    w1, b1, w2, b2 = model.parameters()
    one_group = dropin(name)(model.parameters(), **kwargs)
    train(model, one_group, 0, 2)
    sd = _roundtrip(one_group.state_dict())
    # two groups vs one saved
    two = dropin(name)([dict(params=[w1, b1]), dict(params=[w2, b2])], **kwargs)
    with pytest.raises(ValueError):
        two.load_state_dict(sd)
    assert not any(two.state.get(p) for p in model.parameters()), "a refused load must not leave state behind"
    # one group with fewer params vs four saved
    fewer = dropin(name)([w1, b1, w2], **kwargs)
    with pytest.raises(ValueError):
        fewer.load_state_dict(sd)
    # the refused loads left both optimizers usable as they were
    for opt in (two, fewer):
        opt.zero_grad()
        mse(model, 0).backward()
        opt.step()


def test_load_state_dict_of_another_optimizer_is_refused_cleanly():
    model = mlp()
    src = dropin("AdEMAMix")(model.parameters(), lr=1e-2)
    train(model, src, 0, 2)
    dst = dropin("Adam_C")(model.parameters(), lr=1e-2, topC=3)
    groups_before = [dict(g) for g in dst.param_groups]
    with pytest.raises(ValueError):
        dst.load_state_dict(_roundtrip(src.state_dict()))
    assert [dict(g) for g in dst.param_groups] == groups_before


@pytest.mark.parametrize("src_name,dst_name", [("AdEMAMix", "AdEMAMix_C"), ("AdEMAMix_C", "AdEMAMix")])
def test_load_state_dict_across_the_critical_buffer_is_refused_cleanly(src_name, dst_name):
    """AdEMAMix and AdEMAMix_C keep AdEMAMix's moments under the same names; neither loads the other's state."""
    model = mlp()
    src = dropin(src_name)(model.parameters(), lr=1e-2)
    train(model, src, 0, 2)
    dst = dropin(dst_name)(model.parameters(), lr=1e-2)
    groups_before = [dict(g) for g in dst.param_groups]
    with pytest.raises(ValueError):
        dst.load_state_dict(_roundtrip(src.state_dict()))
    assert [dict(g) for g in dst.param_groups] == groups_before
    assert not any(dst.state.get(p) for p in model.parameters())


def test_state_dict_snapshot_is_not_changed_by_later_steps_after_save():
    """What torch.save wrote is what torch.load gives back, even though the run went on."""
    model = mlp()
    opt = dropin("Adam_C")(model.parameters(), lr=1e-2, topC=3)
    train(model, opt, 0, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    frozen = {pid: {k: v.clone() for k, v in e.items()} for pid, e in opt.state_dict()["state"].items()}
    train(model, opt, 2, 5)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for pid, entry in frozen.items():
        for key, value in entry.items():
            assert torch.equal(loaded["state"][pid][key], value), f"{pid}/{key}"


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix"])
def test_state_changed_by_hand_between_steps_is_checked_again(name):
    """A step checks the state's layout unless it is, tensor for tensor, what the last step left
    (then the step made it so): a tensor put into ``state`` or a parameter given a new shape is
    refused, naming the mismatch, and nothing moves."""
    model = mlp()
    opt = dropin(name)(model.parameters(), lr=1e-2)
    rule_checks = []
    train(model, opt, 0, 2)
    rule = next(iter(opt.groups.rules.values()))
    original = rule.check_state
    rule.check_state = lambda state, params: (rule_checks.append(1), original(state, params))[1]
    train(model, opt, 2, 4)
    assert rule_checks == []  # the state the steps left: no new check
    p = next(iter(model.parameters()))
    key = "exp_avg_sq"
    kept = opt.state[p][key]
    opt.state[p][key] = torch.zeros(3, dtype=kept.dtype)
    before = [q.detach().clone() for q in model.parameters()]
    opt.zero_grad()
    mse(model, 4).backward()
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.step()
    assert rule_checks and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.state[p][key] = kept
    opt.step()  # the state is whole again
    rule_checks.clear()
    opt.load_state_dict(opt.state_dict())  # loaded state is checked at its first step
    mse(model, 5).backward()
    opt.step()
    assert rule_checks
    p.data = torch.zeros(p.shape[0] + 1, *p.shape[1:], dtype=p.dtype)
    p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError):
        opt.step()
