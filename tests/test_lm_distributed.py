"""``memopt-func lm --ddp`` and ``--fsdp``: the real command under ``torchrun`` with two CPU
processes (gloo) matches the same run in one process, and the flags' errors.

Tolerance: both runs are float32 and differ only in the order of a few sums (the mean of each
rank's half-batch mean instead of one mean over the batch; the validation windows split over the
ranks). Over the four steps here the losses agree to about two float32 ulps (measured on a 2-core
x86 CPU: at most 9.5e-7 on a batch loss and 9e-8 on a validation loss, at a loss of about 5.3;
float32's ulp there is 4.8e-7). 1e-5 sits well above that and far below a wrong data split: with
both ranks training on the first half of every batch the final validation loss moves by 3.9e-2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt_func.apps.cli import main

dist = torch.distributed
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch without distributed support or gloo"
)

ROOT = Path(__file__).resolve().parent.parent
TEXT = Path(json.__file__).parent
TIMEOUT_S = 240
# The fewest steps that still step the critical buffer past warm-up, on a tiny model.
TINY = [
    "--data", TEXT, "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--context", "16", "--d-model", "16",
    "--layers", "1", "--heads", "2", "--eval-tokens", "256", "--seeds", "1", "--optimizers", "Adam_CM",
    "--lr", "Adam_CM=2e-3", "--no-progress",
]
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "memopt_func", "lm", *map(str, argv), "--out", str(out),
    ]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _run(out: Path) -> dict:
    (run,) = json.loads((out / "curves.json").read_text())["runs"]
    return run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "lm"
    assert main(["lm", *map(str, TINY), "--out", str(out)]) == 0
    return _run(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, one_process, tmp_path):
    out = tmp_path / "lm"
    done = _torchrun(*TINY, f"--{mode}", out=out)
    assert done.returncode == 0, done.stdout + done.stderr
    two = _run(out)
    assert json.loads((out / "curves.json").read_text())["world_size"] == 2
    assert two["error"] is None
    assert len(two["batch_loss"]) == len(one_process["batch_loss"]) == 4
    assert two["val_loss"][0] == pytest.approx(one_process["val_loss"][0], abs=TOL)
    assert two["val_loss"][-1] < two["val_loss"][0] - 1e-3, "the run must train, or matching proves little"
    assert two["batch_loss"] == pytest.approx(one_process["batch_loss"], abs=TOL)
    assert two["val_loss"] == pytest.approx(one_process["val_loss"], abs=TOL)
    # Only rank 0 prints the table.
    assert done.stdout.count("val loss: final validation cross-entropy") == 1, done.stdout


def test_fsdp_without_torchrun_is_a_world_of_one(one_process, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "lm"
    assert main(["lm", *map(str, TINY), "--fsdp", "--out", str(out)]) == 0
    assert not dist.is_initialized(), "the process group must be destroyed at the end"
    assert _run(out)["val_loss"] == pytest.approx(one_process["val_loss"], abs=TOL)


def test_fsdp_with_compile_is_refused_up_front(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lm", *map(str, TINY), "--fsdp", "--compile", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "--compile does not combine with --fsdp" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_ddp_and_fsdp_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["lm", "--ddp", "--fsdp", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
