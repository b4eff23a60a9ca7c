"""Every optimizer on FSDP2 (DTensor, uneven shards) and DDP, two CPU processes with gloo,
against the same run in one process (SPEC.md, "Sharded parameters (DTensor / FSDP2) and
replicas (DDP)")."""

from __future__ import annotations

import pytest
import torch

import dist_jobs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")

NAMES = ("Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix")
HYPER = {
    "Adam_CM": dict(lr=1e-2, topC=3, decay=0.97, weight_decay=0.01),
    "Adam_C": dict(lr=1e-2, topC=3, decay=0.97),
    "RMSprop_C": dict(lr=1e-3, topC=3, decay=0.97, momentum=0.5),
    "SGD_C": dict(lr=1e-3, topC=3, decay=0.97, momentum=0.9),
    "AdEMAMix": dict(lr=1e-2, alpha=5.0, beta3_warmup=10),
}


@pytest.fixture(scope="module")
def pool():
    from dist_pool import Pool

    p = Pool()
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_one_process(pool, name, mode):
    r0, r1 = pool.run("dist_jobs", "train", name=name, hyper=HYPER[name], mode=mode)
    assert r0["err"] <= 1e-10 and r1["err"] <= 1e-10, (r0["err"], r1["err"])
    assert r0["keys"] == r1["keys"], "ranks must hold bitwise-equal keys and counters"
    if name != "AdEMAMix":
        assert r0["stats"] == r0["ref_stats"], "the same admissions as one process"
        assert 0 < r0["stats"]["no"] and 0 < r0["stats"]["yes"], "the stream must make the buffer admit and refuse"
    if mode == "fsdp":
        assert r0["sharded_like"] and r1["sharded_like"], "state must be DTensors sharded like their parameters"
        for r in (r0, r1):
            assert r["local_bytes"] < 0.65 * r["ref_bytes"], f"per-rank state {r['local_bytes']} B of {r['ref_bytes']} B"


@pytest.mark.parametrize("name", ["Adam_C", "Adam_CM"])
def test_skewed_shards_take_the_full_norm(pool, name):
    r0, r1 = pool.run("dist_jobs", "skew", name=name)
    assert r0["err"] <= 1e-10 and r0["keys"] == r1["keys"]
    assert 0 < r0["accepted"] < r0["offers"]


@pytest.mark.parametrize("wrong", ["local", "sum_of_shard_norms"])
def test_skew_catches_wrong_norm_combinations(pool, wrong):
    """The skew test fails for a rank-local norm and for a sum of shard norms."""
    r0, r1 = pool.run("dist_jobs", "skew", name="Adam_C", wrong=wrong)
    assert r0["err"] > 1e-6 or r0["keys"] != r1["keys"]


def test_replicated_dtensors_take_no_collective(pool):
    """A ``Replicate()`` DTensor's local tensor is the whole tensor: its norm is used as it is (an
    all-reduce of it would count it once per rank, off by sqrt(2) here)."""
    r0, r1 = pool.run("dist_jobs", "replicated", name="Adam_C")
    assert r0["err"] <= 1e-12 and r0["keys_err"] <= 1e-12, (r0["err"], r0["keys_err"])
    assert r0["keys"] == r1["keys"]


@pytest.mark.parametrize("name", ["Adam_CM", "AdEMAMix"])
def test_distributed_checkpoint_resumes_bitwise(pool, tmp_path, name):
    r0, r1 = pool.run("dist_jobs", "dcp_resume", name=name, path=str(tmp_path / "ckpt"))
    assert r0["bitwise"] and r1["bitwise"]
    assert r0["final"] == r1["final"]


def test_compiled_dropin_under_ddp(pool):
    r0, r1 = pool.run("dist_jobs", "train", name="Adam_CM", hyper=HYPER["Adam_CM"], mode="ddp", steps=6, use_compiled=True)
    assert r0["err"] <= 1e-10 and r0["keys"] == r1["keys"]


def _close(a, b, rtol=1e-10):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return bool(((ta - tb).abs().max() <= rtol * tb.abs().max()).item())


@pytest.mark.parametrize("name", ["Adam_C", "AdEMAMix"])
def test_checkpoints_reshard_two_to_one_and_one_to_two(pool, tmp_path, name):
    two = pool.run("dist_jobs", "dcp_resume", name=name, path=str(tmp_path / "two"))[0]
    # 2 -> 1: the two-process checkpoint loads into one process with full tensors
    one = dist_jobs.single_process(name, str(tmp_path / "two"), save=False)
    assert all(_close(a, b) for a, b in zip(one, two["final"]))
    # 1 -> 2: a one-process checkpoint loads into FSDP2 shards
    single = dist_jobs.single_process(name, str(tmp_path / "one"), save=True)
    r0, r1 = pool.run("dist_jobs", "load_and_train", name=name, path=str(tmp_path / "one"))
    assert r0 == r1 and all(_close(a, b) for a, b in zip(r0, single))


def test_compiled_dropins_refuse_fsdp2_parameters_naming_it(pool):
    messages = pool.run("dist_jobs", "compiled_on_fsdp")
    assert all("FSDP2" in m and "memopt_func.optim" in m for m in messages), messages
