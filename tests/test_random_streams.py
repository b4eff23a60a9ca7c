"""The random streams stay put (SPEC.md, "Random streams"): a field's stream id is a constant, and
the bits drawn for a few (seed, step, field, position, element) are pinned here, as 0.2.0 and
the versions since 2026-11-30 draw them, so that a change to any stream cannot pass unnoticed
(it would make a resumed run with stochastic rounding or ``critical_test`` leave its course)."""

from __future__ import annotations

import torch

from memopt_func import _codes, storage
from memopt_func._counter_hash import uniform

# u * 2**32 of elements 0..3 of the tensor at position 2, seed 5, step 3, per field.
PINNED = {
    "exp_avg": [2277673215, 2678391764, 2363851001, 3943991911],
    "exp_avg_slow": [2752922648, 2394775491, 4250077747, 2599155595],
    "momentum_buffer": [309259985, 3363504373, 2944883840, 1273995635],
    "grad_avg": [1636275986, 1541508995, 3812460962, 2299555280],
    "exp_avg_sq": [658067367, 2917354662, 1963720650, 1848975629],
    "max_exp_avg_sq": [1859477616, 2836375055, 330040682, 1042083113],
    "square_avg": [4015826955, 139662941, 1316794191, 1588536222],
    "buf": [115971925, 2738736958, 3219827605, 448520901],
    "params": [231235769, 2597901274, 301795955, 226558101],
}


def _bits(u: torch.Tensor) -> list[int]:
    return [int(x) for x in (u * 2**32).long()]


def test_every_field_draws_its_pinned_bits():
    assert set(storage.STREAM_ID) == set(PINNED), "a new field needs its pinned draw here (and a new stream id)"
    for field, want in PINNED.items():
        u = storage.random_uniform(torch.zeros(4), seed=5, step=torch.tensor(3), field=field, position=2)
        assert _bits(u) == want, field


def test_the_critical_test_draw_is_pinned():
    """``critical_test``'s draw: counter = the row's offers so far, stream = the row."""
    assert _bits(uniform(7, torch.tensor([0, 1, 5]), torch.tensor([0, 0, 3]))) == [249255412, 3309678018, 3701380755]


def test_stream_ids_are_distinct_small_constants_covering_every_stored_field():
    ids = list(storage.STREAM_ID.values())
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and 0 <= i < 64 for i in ids)
    assert set(storage.MOMENTS) | {"buf", "params"} <= set(storage.STREAM_ID)


def test_no_two_fields_positions_or_steps_share_a_stream():
    streams = {
        int(_codes._stream(torch.tensor(step), field, position))
        for step in range(1, 40)
        for field in storage.STREAM_ID
        for position in range(50)
    }
    assert len(streams) == 39 * len(storage.STREAM_ID) * 50
