"""The command line (``memopt-func`` / ``python -m memopt_func``): argument handling, and a tiny
end-to-end run of every subcommand that writes its files and prints its table."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from memopt_func.apps import benchmarking, catalog, demo, surfaces
from memopt_func.apps.cli import main
from memopt_func.rules import RULES


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def exit_code(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        run_cli(*argv)
    return info.value.code


# --- argument handling ---------------------------------------------------------------------


def test_top_level_help_lists_subcommands(capsys):
    assert exit_code("--help") == 0
    out = capsys.readouterr().out
    for cmd in ("lm", "demo", "surfaces", "bench", "memory"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["lm", "demo", "surfaces", "bench"])
def test_subcommand_help_explains_common_options(cmd, capsys):
    assert exit_code(cmd, "--help") == 0
    out = capsys.readouterr().out
    for option in ("--optimizers", "--out", "--seed", "--no-progress"):
        assert option in out
    assert "Adam_CM" in out  # the valid names are listed


def test_missing_subcommand_is_a_usage_error(capsys):
    assert exit_code() == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["demo", "surfaces", "bench"])
def test_unknown_optimizer_lists_valid_names(cmd, capsys):
    assert exit_code(cmd, "--optimizers", "Adam,Adamm", "--out", "unused") == 2
    err = capsys.readouterr().err
    assert "'Adamm'" in err
    for name in catalog.NAMES:
        assert name in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["demo", "--steps", "-5"], "positive integer"),
        (["demo", "--steps", "0"], "positive integer"),
        (["demo", "--steps", "ten"], "positive integer"),
        (["demo", "--batch-size", "0"], "positive integer"),
        (["demo", "--seed", "-1"], "integer >= 0"),
        (["demo", "--lr", "Adam=-1"], "learning rates"),
        (["demo", "--lr", "Nope=0.1"], "unknown optimizer"),
        (["demo", "--lr", "Adam=fast"], "NAME=LR"),
        (["demo", "--optimizers", ","], "no optimizer"),
        (["demo", "--train-size", "1"], "at least 2"),
        (["surfaces", "--starts", "0"], "positive integer"),
        (["surfaces", "--steps", "-1"], "positive integer"),
        (["surfaces", "--functions", "ackley,sphere"], "unknown function"),
        (["bench", "--sizes", "0"], ">= 1"),
        (["bench", "--sizes", "1e4,lots"], "comma-separated"),
        (["bench", "--budget", "0"], "positive number"),
        (["bench", "--device", "tpu"], "--device"),
    ],
)
def test_bad_values_are_usage_errors(argv, fragment, capsys, tmp_path):
    assert exit_code(*argv, "--out", tmp_path / "o") == 2
    assert fragment in capsys.readouterr().err


def test_python_dash_m_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "memopt_func", "bench", "--optimizers", "Foo"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown optimizer" in proc.stderr and "Adam_CM" in proc.stderr


def test_optimizer_names_are_case_insensitive_and_deduplicated():
    assert catalog.parse_names("adam_cm, ADAM,Adam_CM") == ["Adam_CM", "Adam"]
    assert set(catalog.NAMES) == set(RULES)


# --- measurements and the surfaces experiment's independence --------------------------------


def test_state_bytes_and_roofline_bytes_of_torch_adam():
    params = benchmarking.make_params(1000, n_tensors=3)
    assert sum(p.numel() for p in params) == 1000
    opt = catalog.make_optimizer("Adam", params, lr=1e-3)
    opt.step()
    state = benchmarking.state_bytes(opt)
    assert 8 * 1000 <= state <= 8 * 1000 + 3 * 8  # exp_avg + exp_avg_sq, plus a scalar step each
    # params read + written, grads read, exp_avg and exp_avg_sq read + written; step scalars are noise
    assert benchmarking.bytes_per_step(opt) == 2 * 4000 + 4000 + 2 * 2 * 4000


def test_roofline_counts_the_critical_buffer_as_one_slot():
    params = benchmarking.make_params(1000, n_tensors=2)
    opt = catalog.make_optimizer("Adam_CM", params, lr=1e-3)  # topC=5: buf is 5 x 4000 B
    opt.step()
    # exp_avg, exp_avg_sq and one slot of critical_buf (float32), and critical_buf_sum (float64),
    # each read + written
    assert benchmarking.bytes_per_step(opt) == 2 * 4000 + 4000 + 3 * 2 * 4000 + 2 * 8000


def test_surface_starts_are_independent_runs():
    surface = surfaces.SURFACES["ackley"]
    rule = surfaces.rule_for("Adam_CM", surface, {})
    start = surfaces.starts(surface, 3, seed=1)
    together = surfaces.run_rule(surface, rule, start, steps=6)
    for i in range(3):
        alone = surfaces.run_rule(surface, rule, start[i : i + 1], steps=6)
        torch.testing.assert_close(alone[:, 0], together[:, i], rtol=0, atol=0)


def test_basin_membership():
    s = surfaces.SURFACES["himmelblau"]
    points = torch.tensor([[3.0, 2.0], [-2.8, 3.13], [0.0, 0.0]], dtype=torch.float64)
    assert surfaces.in_basin(s, points).tolist() == [True, True, False]


# --- tiny end-to-end runs ----------------------------------------------------------------------

TINY_DEMO = ["--steps", "4", "--train-size", "64", "--val-size", "32", "--batch-size", "16", "--hidden", "8", "--eval-every", "2"]


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", *TINY_DEMO, "--optimizers", "Adam,Adam_CM,SGD_C", "--lr", "Adam=0.02", "--out", out) == 0
    text = capsys.readouterr().out
    for word in ("train loss", "val acc", "state B/param", "Adam_CM", "SGD_C"):
        assert word in text
    for name in ("loss_curves.png", "state_bytes.png", "results.csv", "curves.json"):
        assert (out / name).stat().st_size > 0
    rows = {r["optimizer"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert float(rows["Adam"]["lr"]) == 0.02
    assert float(rows["Adam"]["state B/param"]) == pytest.approx(8.0, abs=0.5)  # + a 4-byte step per tensor
    assert float(rows["Adam_CM"]["state B/param"]) > 8.0  # the critical buffer is counted
    curves = json.loads((out / "curves.json").read_text())
    assert [r["steps"] for r in curves["runs"]][0] == [0, 2, 4]


def test_demo_reports_a_failing_optimizer_and_keeps_the_others(monkeypatch, tmp_path, capsys):
    real = catalog.make_optimizer

    def make_optimizer(name, params, **hyper):
        if name == "SGD_C":
            raise RuntimeError("boom")
        return real(name, params, **hyper)

    monkeypatch.setattr(catalog, "make_optimizer", make_optimizer)
    assert run_cli("demo", *TINY_DEMO, "--optimizers", "SGD_C,Adam", "--no-progress", "--out", tmp_path) == 1
    text = capsys.readouterr().out
    assert "! SGD_C: RuntimeError: boom" in text
    assert (tmp_path / "loss_curves.png").exists()


def test_demo_compiled_flag_uses_compile_optimizer(monkeypatch, tmp_path, capsys):
    wrapped = []

    def compile_optimizer(opt):
        wrapped.append(type(opt).__name__)
        return opt

    monkeypatch.setattr(demo, "compile_optimizer", compile_optimizer)
    assert run_cli("demo", *TINY_DEMO, "--optimizers", "Adam,AdEMAMix", "--compiled", "--no-progress", "--out", tmp_path) == 0
    assert wrapped == ["AdEMAMix"]  # torch.optim baselines stay eager
    assert "AdEMAMix (compiled)" in capsys.readouterr().out


def test_surfaces_end_to_end(tmp_path, capsys):
    out = tmp_path / "surf"
    argv = ["surfaces", "--steps", "5", "--starts", "3", "--functions", "ackley,himmelblau", "--optimizers", "Adam,Adam_CM"]
    assert run_cli(*argv, "--seed", "7", "--no-progress", "--out", out) == 0
    text = capsys.readouterr().out
    assert "seed 7" in text and "in global basin" in text and "median f-f*" in text
    for name in ("trajectories_ackley.png", "trajectories_himmelblau.png", "summary.png", "results.csv", "final_points.json"):
        assert (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["function"], r["optimizer"]) for r in rows] == [
        ("ackley", "Adam"), ("ackley", "Adam_CM"), ("himmelblau", "Adam"), ("himmelblau", "Adam_CM")
    ]


def test_rosenbrock_toy_end_to_end(tmp_path, capsys):
    out = tmp_path / "toy"
    assert run_cli("surfaces", "--rosenbrock-toy", "--steps", "40", "--no-progress", "--out", out) == 0
    text = capsys.readouterr().out
    assert "from (-3.0, 5.0), lr 0.003" in text and "dist @ N" in text
    labels = [f"Adam b1={b}" for b in ("0.9", "0.99", "0.999", "0.9999")] + ["AdEMAMix b3=0.999", "AdEMAMix b3=0.9999"]
    for label in labels:
        assert label in text
    assert (out / "rosenbrock_toy.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "rosenbrock_toy.csv").open()))
    assert [r["run"] for r in rows if r["step"] == "0"] == labels
    assert all(float(r["distance"]) == pytest.approx(math.hypot(4, 4)) for r in rows if r["step"] == "0")


def test_rosenbrock_toy_ademamix_schedules_beta3_from_zero():
    toy = surfaces.RosenbrockToyConfig(steps=100)
    rule = dict(surfaces.toy_rules(toy))["AdEMAMix b3=0.9999"]
    assert rule.hyper["betas"][0] == 0.0 and rule.hyper["betas"][2] == 0.9999
    assert rule.hyper["beta3_warmup"] == rule.hyper["alpha_warmup"] == 100


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--sizes", "100,1k", "--optimizers", "Adam,Adam_C", "--repeats", "3", "--warmup", "1", "--copy-mb", "8"]
    assert run_cli(*argv, "--no-progress", "--out", out) == 0
    text = capsys.readouterr().out
    assert "GB/s" in text and "roofline ms" in text and "1,000" in text
    assert (out / "step_time.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert data["copy_bandwidth_bytes_per_s"] > 0
    cells = {(c["optimizer"], c["params"]): c for c in data["cells"]}
    assert set(cells) == {("Adam", 100), ("Adam", 1000), ("Adam_C", 100), ("Adam_C", 1000)}
    # Adam_C keeps topC=10 buffered gradients besides Adam's two moments.
    assert cells[("Adam_C", 1000)]["state_bytes"] > 10 * cells[("Adam", 1000)]["state_bytes"] / 2


def test_memory_end_to_end(tmp_path, capsys):
    """memopt-func memory measures state bytes from state_dict; 8-bit storage meets the targets."""
    out = tmp_path / "memory"
    assert run_cli("memory", "--optimizers", "AdamW,Adam_CM", "--params", "1e9", "--out", out) == 0
    text = capsys.readouterr().out
    for word in ("B/param", "GB at", "torchao AdamW8bit", "int8", "bf16"):
        assert word in text
    rows = {(r["optimizer"], r["storage"]): float(r["bytes_per_param"]) for r in csv.DictReader((out / "memory.csv").open())}
    assert rows[("AdamW", "fp32")] == pytest.approx(8.0, abs=0.01)
    assert rows[("AdamW", "bf16")] == pytest.approx(4.0, abs=0.01)
    assert rows[("AdamW", "int8")] <= 2.2 and rows[("Adam_CM", "int8")] <= 12.5
    assert (out / "memory.png").stat().st_size > 0


def test_memory_rejects_an_unknown_storage(capsys):
    assert exit_code("memory", "--storage", "fp32,int4", "--out", "unused") == 2
    assert "int4" in capsys.readouterr().err


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_demo_with_narrow_state_storage(storage, tmp_path, capsys):
    out = tmp_path / storage
    assert run_cli("demo", *TINY_DEMO, "--optimizers", "AdamW,Adam_CM", "--storage", storage, "--out", out) == 0
    assert "!" not in capsys.readouterr().out  # no optimizer failed
    rows = {r["optimizer"]: r for r in csv.DictReader((out / "results.csv").open())}
    if storage == "bf16":  # this package's AdamW rule with bf16 state (the demo's tensors are too small for int8)
        assert float(rows["AdamW"]["state B/param"]) < 8.0


def test_demo_set_reaches_the_optimizer_and_the_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", *TINY_DEMO, "--optimizers", "Adam_CM,AdamW", "--set", "Adam_CM:topC=2,buffer_dtype=torch.bfloat16",
            "--set", "adamw:beta2=0.99", "--out", out]
    assert run_cli(*argv) == 0
    assert "--set Adam_CM:topC=2,buffer_dtype=torch.bfloat16" in capsys.readouterr().out
    data = json.loads((out / "curves.json").read_text())
    runs = {r["optimizer"]: r["hyper"] for r in data["runs"]}
    assert runs["Adam_CM"]["topC"] == 2 and runs["Adam_CM"]["buffer_dtype"] == "torch.bfloat16"
    assert runs["AdamW"]["betas"] == [0.9, 0.99]
    assert data["config"]["hyper"]["AdamW"] == {"beta2": 0.99}


def test_demo_set_refused_by_the_optimizer_names_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("demo", *TINY_DEMO, "--set", "SGD_C:momentum=-1", "--out", tmp_path / "d")
    assert info.value.code == 2
    assert "--set SGD_C:momentum=-1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--set", "Adam_CM:state_dtype=torch.float16", "--storage", "bf16"], "give them either through it or one by one"),
        (["--set", "AdamW:fused=True"], "--set AdamW:fused=True"),  # torch.optim raises RuntimeError for it
        (["--optimizers", "Adam", "--set", "Adam_CM:topC=2"], "Adam_CM is not among the optimizers of this run"),
    ],
)
def test_demo_set_conflicts_are_usage_errors(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("demo", *TINY_DEMO, *argv, "--out", tmp_path / "d")
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_a_later_betas_replaces_earlier_beta_entries():
    from memopt_func.apps import common

    parse = common.hyper_overrides()
    merged = common.merge_hyper_overrides([parse("AdEMAMix:beta3=0.99"), parse("AdEMAMix:betas=(0.8,0.999,0.9999)")])
    assert common.with_overrides("AdEMAMix", {}, merged["AdEMAMix"])["betas"] == (0.8, 0.999, 0.9999)
    merged = common.merge_hyper_overrides([parse("AdEMAMix:betas=(0.8,0.999,0.9999)"), parse("AdEMAMix:beta3=0.99")])
    assert common.with_overrides("AdEMAMix", {}, merged["AdEMAMix"])["betas"] == (0.8, 0.999, 0.99)
