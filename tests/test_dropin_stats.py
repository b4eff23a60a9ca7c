"""get_offline_stats / reset_offline_stats on hand-worked gradient sequences.

With topC = 2 and decay = 0.5, offering priorities 4, 4, 1, 1.5, 0.2 (one tensor):
  step 1: fill slot 0 (key 4)            -> keys after decay [2, -]
  step 2: fill slot 1 (key 4)            -> [1, 2]
  step 3: full, min key 1, nu = 1 is not > 1: refused       -> [0.5, 1]
  step 4: full, min key 0.5, nu = 1.5 > 0.5: admitted       -> [0.75, 0.5]
  step 5: full, min key 0.5, nu = 0.2: refused               -> [0.375, 0.25]
so offers 5, accepted 3 (2 while filling), refused 2; yes 1, no 2.
Priorities 1, 2, 3, 4, 5 are all admitted: offers 5, accepted 5, yes 3, no 0.
(All values are exact binary fractions, so the strict comparison at step 3 is exact.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropin_common import CRITICAL, dropin

SEQ_A = [4.0, 4.0, 1.0, 1.5, 0.2]
STATS_A = dict(offers=5, accepted=3, refused=2, yes=1, no=2)
SEQ_B = [1.0, 2.0, 3.0, 4.0, 5.0]
STATS_B = dict(offers=5, accepted=5, refused=0, yes=3, no=0)
KEYS = ("yes", "no", "offers", "accepted", "refused")


def _grad(norm: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([norm, 0.0, 0.0], dtype=dtype)


def _feed(opt, params, seqs, k):
    for p, seq in zip(params, seqs):
        p.grad = None if seq[k] is None else _grad(seq[k])
    opt.step()


def _check(stats, want, where="total"):
    got = {k: stats[k] for k in KEYS}
    assert got == want, f"{where}: {got} != {want}"
    assert all(type(stats[k]) is int for k in KEYS), "stats must be plain ints"


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_single_tensor_hand_sequence(name):
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([p], lr=1e-3, topC=2, decay=0.5)
    _check(opt.get_offline_stats(), dict(offers=0, accepted=0, refused=0, yes=0, no=0))
    seen = []
    for k in range(5):
        _feed(opt, [p], [SEQ_A], k)
        seen.append(opt.get_offline_stats()["offers"])
    assert seen == [1, 2, 3, 4, 5]
    _check(opt.get_offline_stats(), STATS_A)
    # the keys the buffer holds are exactly the hand-worked ones
    assert opt.state[p]["critical_keys"].tolist() == [[0.375, 0.25]]  # step 5 decays [0.75, 0.5] too
    assert opt.get_offline_stats()["groups"] == [dict(yes=1, no=2, offers=5, accepted=3, refused=2, nonfinite=0)]

    opt.reset_offline_stats()
    _check(opt.get_offline_stats(), dict(offers=0, accepted=0, refused=0, yes=0, no=0))
    # counting restarts from zero: 10 > 0.5 admitted; 0.01 refused
    for norm in (10.0, 0.01):
        p.grad = _grad(norm)
        opt.step()
    _check(opt.get_offline_stats(), dict(offers=2, accepted=1, refused=1, yes=1, no=1))
    # reading stats does not change them
    _check(opt.get_offline_stats(), dict(offers=2, accepted=1, refused=1, yes=1, no=1))


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_per_tensor_count_each_tensor(name):
    a = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([a, b], lr=1e-3, topC=2, decay=0.5, synced=False)
    for k in range(5):
        _feed(opt, [a, b], [SEQ_A, SEQ_B], k)
    _check(opt.get_offline_stats(), {k: STATS_A[k] + STATS_B[k] for k in KEYS})


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_synced_one_offer_per_step_with_summed_norms(name):
    """Synced: nu is the sum of the tensors' norms (halves of SEQ_A here), one offer per step."""
    a = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([a, b], lr=1e-3, topC=2, decay=0.5, synced=True)
    halves = [x / 2 for x in SEQ_A]
    for k in range(5):
        _feed(opt, [a, b], [halves, halves], k)
    _check(opt.get_offline_stats(), STATS_A)


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_synced_skipped_tensor_still_counts_group_offer(name):
    """A tensor without a gradient leaves the group's offer count moving with the others."""
    a = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([a, b], lr=1e-3, topC=2, decay=0.5, synced=True)
    seq_b = [None, None, None, None, None]  # b never has a gradient: nu comes from a alone
    for k in range(5):
        _feed(opt, [a, b], [SEQ_A, seq_b], k)
    _check(opt.get_offline_stats(), STATS_A)


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_per_group_and_reset_per_group(name):
    a = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([dict(params=[a]), dict(params=[b], topC=3)], lr=1e-3, topC=2, decay=0.5)
    for k in range(5):
        _feed(opt, [a, b], [SEQ_A, SEQ_B], k)
    stats = opt.get_offline_stats()
    # group 1 has topC = 3: 1, 2, 3 fill; 4 and 5 beat the smallest decayed key
    want_b = dict(offers=5, accepted=5, refused=0, yes=2, no=0, nonfinite=0)
    assert stats["groups"][0] == {**{k: STATS_A[k] for k in KEYS}, "nonfinite": 0}
    assert stats["groups"][1] == want_b
    _check(stats, {k: STATS_A[k] + want_b[k] for k in KEYS})
    opt.reset_offline_stats()
    stats = opt.get_offline_stats()
    assert all(g[k] == 0 for g in stats["groups"] for k in KEYS)


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_critical_test_one_admits_everything(name):
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([p], lr=1e-3, topC=2, decay=0.5, critical_test=1.0)
    for k in range(5):
        _feed(opt, [p], [SEQ_A], k)
    _check(opt.get_offline_stats(), dict(offers=5, accepted=5, refused=0, yes=3, no=0))


@pytest.mark.parametrize("name,kwargs", [("AdEMAMix", {}), ("Adam_CM", dict(kappa=0.0)), ("SGD_C", dict(topC=0)),
                                         ("AdEMAMix_C", dict(kappa=0.0))])
def test_stats_without_buffer_are_zero(name, kwargs):
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([p], lr=1e-3, **kwargs)
    for k in range(3):
        p.grad = _grad(SEQ_A[k])
        opt.step()
    _check(opt.get_offline_stats(), dict(offers=0, accepted=0, refused=0, yes=0, no=0))
    opt.reset_offline_stats()
    _check(opt.get_offline_stats(), dict(offers=0, accepted=0, refused=0, yes=0, no=0))


@pytest.mark.parametrize("name", CRITICAL)
def test_stats_after_load_state_dict_are_sane(name):
    """Loading another run's state after a reset must not give negative counts; a reset after the
    load counts from zero again."""
    p = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = dropin(name)([p], lr=1e-3, topC=2, decay=0.5)
    for k in range(5):
        _feed(opt, [p], [SEQ_A], k)
    opt.reset_offline_stats()
    q = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    src = dropin(name)([q], lr=1e-3, topC=2, decay=0.5)
    for k in range(2):
        _feed(src, [q], [SEQ_B], k)
    opt.load_state_dict(src.state_dict())
    stats = opt.get_offline_stats()
    assert all(stats[k] >= 0 for k in KEYS), f"negative admission counts after load_state_dict: {stats}"
    # either counted since the loaded run began (2 fill offers) or since the load (none yet)
    assert stats["offers"] in (0, 2) and stats["refused"] == 0 and stats["yes"] == 0
    opt.reset_offline_stats()
    _check(opt.get_offline_stats(), dict(offers=0, accepted=0, refused=0, yes=0, no=0))
    p.grad = _grad(10.0)  # beats the smallest decayed key of the loaded buffer
    opt.step()
    _check(opt.get_offline_stats(), dict(offers=1, accepted=1, refused=0, yes=1, no=0))
