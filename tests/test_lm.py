"""``memopt-func lm``: argument handling and errors, the corpus split, the model at
initialisation, tokens-to-target, and tiny end-to-end runs that check the table, CSV and plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from memopt_func.apps import lm
from memopt_func.apps.cli import main

# A few steps of a tiny model on a small slice of real text: the standard library's json package.
TEXT = Path(json.__file__).parent
TINY = [
    "--data", TEXT, "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--context", "16",
    "--d-model", "16", "--layers", "1", "--heads", "2", "--eval-tokens", "256", "--no-progress",
]


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


def exit_code(*argv) -> int:
    with pytest.raises(SystemExit) as info:
        run_cli(*argv)
    return info.value.code


# --- argument handling and errors ------------------------------------------------------------


def test_unknown_optimizer_is_a_usage_error_listing_the_valid_ones(capsys, tmp_path):
    assert exit_code("lm", "--optimizers", "AdamW,Adamm", "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert "'Adamm'" in err
    for name in lm.OPTIMIZERS:
        assert name in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--layers", "0"], "positive integer"),
        (["--d-model", "-8"], "positive integer"),
        (["--context", "many"], "positive integer"),
        (["--seeds", "0"], "positive integer"),
        (["--d-model", "30", "--heads", "4"], "--d-model 30 must be a multiple of --heads 4"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--lr", "AdamW=0"], "learning rates"),
        (["--sweep-lrs", "1e-3,x"], "positive number"),
        (["--context", "100000", "--steps", "2"], "fewer than --context 100000"),
    ],
)
def test_bad_sizes_are_usage_errors(argv, fragment, capsys, tmp_path):
    assert exit_code("lm", "--data", TEXT, *argv, "--out", tmp_path) == 2
    assert fragment in capsys.readouterr().err


def test_data_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert exit_code("lm", "--data", missing, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "lm: error: --data" in err and "no such file or folder" in err


@pytest.mark.parametrize("content", [None, b"\x00\x01\x02binary\x00", b"\xff\xfe\xfa not utf-8"])
def test_data_without_text(content, capsys, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    if content is not None:
        (folder / "blob.bin").write_bytes(content)
    assert exit_code("lm", "--data", folder, "--out", tmp_path / "o") == 2
    assert "no text found" in capsys.readouterr().err


# --- data ------------------------------------------------------------------------------------


def test_corpus_split_is_deterministic_and_disjoint():
    root = lm.stdlib_root()
    names = [p.relative_to(root).as_posix() for p in lm.stdlib_files(root)]
    assert names == sorted(names) and len(names) > 10
    assert not any("site-packages" in n for n in names)
    train, val = lm.split_files(names, 0.05)
    assert (train, val) == lm.split_files(list(reversed(names)), 0.05)  # the order given does not matter
    assert not set(train) & set(val)
    assert sorted(train + val) == names
    assert len(val) == round(0.05 * len(names))


def test_split_keeps_a_file_on_each_side():
    assert lm.split_files(["a", "b"], 0.01) == (["a"], ["b"]) or lm.split_files(["a", "b"], 0.01) == (["b"], ["a"])
    train, val = lm.split_files([f"f{i}" for i in range(3)], 0.99)
    assert len(train) == 1 and len(val) == 2


def test_a_folder_is_split_by_file_and_binary_files_are_left_out(tmp_path):
    for i in range(20):
        (tmp_path / f"m{i:02}.py").write_text(f"x = {i}\n" * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "image.bin").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skip.py").write_text("hidden = True\n")
    corpus = lm.load_corpus(tmp_path, val_fraction=0.1)
    assert len(corpus.train_files) == 18 and len(corpus.val_files) == 2
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus.size == sum(len(f"x = {i}\n" * 50) for i in range(20))
    again = lm.load_corpus(tmp_path, val_fraction=0.1)
    assert again.val_files == corpus.val_files and torch.equal(again.val, corpus.val)


def test_a_single_file_is_split_by_position(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    corpus = lm.load_corpus(path, val_fraction=0.1)
    assert corpus.train.numel() == 900 and corpus.val.numel() == 100
    assert bytes(corpus.val.tolist()) == b"abcdefghij" * 10


def test_batches_are_next_byte_pairs():
    stream = torch.arange(200, dtype=torch.uint8)
    x, y = lm.sample_batch(stream, 5, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    vx, vy = lm.eval_windows(stream, 8, 64)
    assert len(vx) == 8 and int(vx[0, 0]) == 0 and int(vy[-1, -1]) == 199


# --- model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["quick", "default"])
def test_loss_at_initialisation_is_about_ln_256(preset):
    cfg = lm.LMConfig.from_preset(preset)
    model = lm.make_model(cfg, seed=0)
    x, y = lm.sample_batch(torch.randint(0, 256, (10_000,), dtype=torch.uint8), 8, cfg.context, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(model.loss(x, y))
    assert loss == pytest.approx(math.log(256), abs=0.05)


def test_model_is_causal_and_weight_tied():
    cfg = lm.LMConfig.from_preset("quick", context=12, d_model=16, layers=2, heads=4)
    model = lm.make_model(cfg, seed=0)
    x = torch.randint(0, 256, (2, 12))
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :7], model(changed)[:, :7])
    params = dict(model.named_parameters())
    assert "tok.weight" in params and not any("head" in n for n in params)  # the output layer is the embedding
    n_default = sum(p.numel() for p in lm.make_model(lm.LMConfig.from_preset("default"), 0).parameters())
    assert 1e6 <= n_default <= 5e6


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = lm.LMConfig.from_preset("quick", steps=100)
    factors = [lm.lr_factor(s, cfg) for s in range(cfg.steps)]
    assert factors[cfg.warmup_steps - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[: cfg.warmup_steps - 1], factors[1 : cfg.warmup_steps]))
    assert factors[-1] == pytest.approx(cfg.min_lr_ratio)


def test_tokens_to_target_interpolates_between_evaluations():
    steps, curve = [0, 10, 20], [5.0, 3.0, 2.0]
    assert lm.tokens_to_target(steps, curve, 3.0, 100) == pytest.approx(1000)
    assert lm.tokens_to_target(steps, curve, 2.5, 100) == pytest.approx(1500)
    assert lm.tokens_to_target(steps, curve, 1.0, 100) is None


# --- end to end ------------------------------------------------------------------------------


def test_lm_end_to_end(tmp_path, capsys):
    out = tmp_path / "lm"
    assert run_cli("lm", *TINY, "--optimizers", "AdamW,Adam_CM,AdEMAMix", "--seeds", "2", "--lr", "Adam_CM=2e-3", "--out", out) == 0
    text = capsys.readouterr().out
    assert "json" in text and "split by file" in text
    for word in ("val loss", "tokens to target", "tokens/s", "state B/param", "AdamW", "Adam_CM", "AdEMAMix", "+-"):
        assert word in text
    for name in ("loss_curves.png", "curves.csv", "results.csv", "curves.json"):
        assert (out / name).stat().st_size > 0
    rows = {r["optimizer"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["AdamW", "Adam_CM", "AdEMAMix"]
    assert float(rows["Adam_CM"]["lr"]) == 2e-3
    assert rows["AdamW"]["vs baseline"] == "1.00x"
    assert float(rows["AdamW"]["state B/param"]) == pytest.approx(8.0, abs=0.5)
    assert float(rows["AdEMAMix"]["state B/param"]) == pytest.approx(12.0, abs=0.5)  # m1, m2, v
    curves = list(csv.DictReader((out / "curves.csv").open()))
    assert len(curves) == 3 * 2 * 3  # optimizers x seeds x evaluations (steps 0, 3, 6)
    assert {(r["optimizer"], r["seed"]) for r in curves} == {(n, s) for n in ("AdamW", "Adam_CM", "AdEMAMix") for s in ("0", "1")}
    assert all(math.isfinite(float(r["val_loss"])) for r in curves)
    data = json.loads((out / "curves.json").read_text())
    assert data["config"]["steps"] == 6 and len(data["runs"]) == 6
    assert data["runs"][0]["steps"] == [0, 3, 6] and len(data["runs"][0]["batch_loss"]) == 6


def test_same_seed_same_batches_and_initial_weights(tmp_path, capsys):
    assert run_cli("lm", *TINY, "--optimizers", "AdamW,Adam", "--seeds", "2", "--out", tmp_path) == 0
    runs = {(r["optimizer"], r["seed"]): r for r in json.loads((tmp_path / "curves.json").read_text())["runs"]}
    for seed in (0, 1):
        adamw, adam = runs[("AdamW", seed)], runs[("Adam", seed)]
        assert adamw["val_loss"][0] == adam["val_loss"][0]  # same model before the first step
        assert adamw["batch_loss"][0] == adam["batch_loss"][0]  # same first batch
    assert runs[("AdamW", 0)]["val_loss"][0] != runs[("AdamW", 1)]["val_loss"][0]


def test_lr_sweep_end_to_end(tmp_path, capsys):
    argv = ["lm", *TINY, "--optimizers", "AdamW,Adam_C", "--lr-sweep", "--sweep-lrs", "1e-3,1e-2", "--out", tmp_path]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "best: AdamW=" in text and "Adam_C=" in text
    rows = list(csv.DictReader((tmp_path / "lr_sweep.csv").open()))
    assert [(r["optimizer"], float(r["lr"])) for r in rows] == [("AdamW", 1e-3), ("AdamW", 1e-2), ("Adam_C", 1e-3), ("Adam_C", 1e-2)]
    assert sum(r["best"] == "*" for r in rows) == 2
    assert (tmp_path / "lr_sweep.png").stat().st_size > 0


def test_compile_flag_uses_the_compiled_drop_ins(monkeypatch, tmp_path, capsys):
    wrapped, compiled = [], []

    def compile_optimizer(opt):
        wrapped.append(type(opt).__name__)
        return opt

    def fake_compile(fn):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(lm, "compile_optimizer", compile_optimizer)
    monkeypatch.setattr(lm.torch, "compile", fake_compile)
    assert run_cli("lm", *TINY, "--optimizers", "AdamW,Adam_CM", "--seeds", "1", "--compile", "--out", tmp_path) == 0
    assert wrapped == ["Adam_CM"] and len(compiled) == 1  # AdamW through torch.compile(opt.step)
    assert "Adam_CM (compiled)" in capsys.readouterr().out


def test_a_failing_optimizer_is_reported_and_the_others_kept(monkeypatch, tmp_path, capsys):
    real = lm.catalog.make_optimizer

    def make_optimizer(name, params, **hyper):
        if name == "Adam_C":
            raise RuntimeError("boom")
        return real(name, params, **hyper)

    monkeypatch.setattr(lm.catalog, "make_optimizer", make_optimizer)
    assert run_cli("lm", *TINY, "--optimizers", "AdamW,Adam_C", "--out", tmp_path) == 1
    text = capsys.readouterr().out
    assert "! Adam_C seed 0: RuntimeError: boom" in text
    assert (tmp_path / "loss_curves.png").exists()


# --- --set: any constructor argument of one optimizer ----------------------------------------


def test_set_reaches_the_optimizer_and_is_echoed(monkeypatch, tmp_path, capsys):
    real, made = lm.catalog.make_optimizer, {}

    def make_optimizer(name, params, **hyper):
        made[name] = hyper
        return real(name, params, **hyper)

    monkeypatch.setattr(lm.catalog, "make_optimizer", make_optimizer)
    argv = ["lm", *TINY, "--optimizers", "AdEMAMix,Adam_CM", "--set", "AdEMAMix:beta3=0.999,alpha=8",
            "--set", "Adam_CM:topC=10,decay=0.99", "--set", "AdEMAMix:alpha_warmup=None", "--out", tmp_path]
    assert run_cli(*argv) == 0
    assert made["AdEMAMix"]["betas"] == (0.9, 0.999, 0.999) and made["AdEMAMix"]["alpha"] == 8
    assert made["AdEMAMix"]["alpha_warmup"] is None and made["AdEMAMix"]["beta3_warmup"] == 6  # the run-long default kept
    assert made["Adam_CM"]["topC"] == 10 and made["Adam_CM"]["decay"] == 0.99
    text = capsys.readouterr().out
    assert "--set AdEMAMix:beta3=0.999,alpha=8,alpha_warmup=None" in text and "--set Adam_CM:topC=10,decay=0.99" in text
    config = json.loads((tmp_path / "curves.json").read_text())["config"]
    assert config["hyper"] == {"AdEMAMix": {"beta3": 0.999, "alpha": 8, "alpha_warmup": None}, "Adam_CM": {"topC": 10, "decay": 0.99}}


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("AdEMAMix:beta4=0.9", "betas have 3 entries, no beta4"),
        ("AdEMAMix:gamma=1", "AdEMAMix takes no 'gamma'"),
        ("AdEMAMix:lr=1e-3", "with --lr AdEMAMix=LR"),
        ("AdEMAMix", "expected NAME:KEY=VALUE"),
        ("Nope:alpha=1", "unknown optimizer"),
        ("Adam_CM:topC=(1", "cannot read the value"),
    ],
)
def test_a_bad_set_is_a_usage_error_naming_it(setting, fragment, capsys, tmp_path):
    assert exit_code("lm", *TINY, "--set", setting, "--out", tmp_path) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("setting, fragment", [("AdEMAMix:alpha=-1", "invalid alpha: -1"), ("Adam_CM:topC=2.5", "topC")])
def test_a_value_the_optimizer_refuses_fails_before_training(setting, fragment, capsys, tmp_path):
    assert exit_code("lm", *TINY, "--set", setting, "--out", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"--set {setting.split(':')[0]}:" in err and fragment in err
    assert not (tmp_path / "curves.json").exists()
