"""The critical buffer's admission rule (SPEC.md "Offering a value") against a tiny independent
pure-Python model, driven directly through ``memopt_func.critical_buffer`` with random priority
sequences full of ties, for synced and unsynced buffers and leaves that skip steps.

Priorities, decays and values are small dyadic rationals / integers, so every product and sum
is exact in float32 and float64 and the model can be compared bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import ADMISSIONS, sees_admissions_and_refusals
from memopt_func import critical_buffer as cb
from strategies import AGGREGATIONS, shapes

PRIORITIES = [0.0, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0]  # few values: lots of ties
DECAYS = [1.0, 1.0, 1.0, 1.0, 0.5, 0.75, 0.0]  # mostly 1: keys outlive steps, so a full buffer refuses too


class Model:
    """One key row of SPEC's buffer: keys, count, and per leaf the slot values (None = never
    written, which counts as 0)."""

    def __init__(self, top_c: int, leaves: list[int]) -> None:
        self.top_c = top_c
        self.keys = [0.0] * top_c
        self.count = 0
        self.offers = 0
        self.accepted = 0
        self.values = {i: [None] * top_c for i in leaves}

    def slot(self) -> int:
        if self.count < self.top_c:
            return self.count
        return self.keys.index(min(self.keys))  # argmin, first index on ties

    def strictly_admits(self, nu: float) -> bool:
        return self.count < self.top_c or nu > self.keys[self.slot()]

    def offer(self, nu: float, xs: dict[int, float], admitted: bool) -> None:
        s = self.slot()
        self.offers += 1
        if self.count < self.top_c:
            self.count += 1
        if admitted:
            self.accepted += 1
            self.keys[s] = nu
            for i, x in xs.items():
                self.values[i][s] = x

    def decay(self, factor: float) -> None:
        self.keys = [k * factor for k in self.keys]

    def buf_sum(self, i: int) -> float:
        return sum(v or 0.0 for v in self.values[i][: self.count])

    def mean(self, i: int) -> float:
        return self.buf_sum(i) / self.count

    def aggregate(self, i: int, x: float, kappa: float, aggr: str) -> float:
        if aggr == "mean":
            return (x + kappa * self.buf_sum(i)) / (self.count + 1)
        if self.count == 0:
            return x
        return x + kappa * self.mean(i) if aggr == "sum" else kappa * self.mean(i)


@dataclass
class Offer:
    present: tuple[bool, ...]
    nus: tuple[float, ...]  # one per leaf (synced: the first is the group's)
    decay: float


@st.composite
def admission_cases(draw, synced: bool):
    n = draw(st.integers(1, 3), label="leaves")
    top_c = draw(st.integers(1, 6), label="topC")
    dtype = draw(st.sampled_from([torch.float64, torch.float32]), label="dtype")
    leaf_shapes = [draw(shapes()) for _ in range(n)]
    critical_test = draw(st.sampled_from([0.0, 0.0, 0.0, 1.0, 0.5]), label="critical_test")
    seed = draw(st.integers(0, 2**31), label="seed")
    offers = []
    # long enough to fill the buffer (every state on the way is checked) and then make it choose
    for _ in range(draw(st.integers(top_c + 3, top_c + 18), label="steps")):
        present = tuple(draw(st.integers(0, 3)) != 0 for _ in range(n))
        if not any(present):
            present = (True,) + present[1:]
        nus = tuple(draw(st.sampled_from(PRIORITIES)) for _ in range(n))
        offers.append(Offer(present, nus, draw(st.sampled_from(DECAYS))))
    kappa = draw(st.sampled_from([1.0, 0.5, 2.0]))
    aggr = draw(st.sampled_from(AGGREGATIONS))
    return n, top_c, dtype, leaf_shapes, critical_test, seed, offers, kappa, aggr


@pytest.mark.parametrize("synced", [True, False], ids=["synced", "unsynced"])
@sees_admissions_and_refusals(0.12)
@given(data=st.data())
def test_admission_rule_matches_pure_python_model(synced, data):
    """SPEC "Offering a value": not full -> slot = count, count += 1, admitted; full -> slot =
    first argmin(keys), admitted iff nu > key (strict; ties refuse), or unconditionally with
    critical_test = 1 (with 0 < critical_test < 1 a refusal may become an admission into the
    same slot); admitted -> buf[slot] = x, buf_sum += x - old, keys[slot] = nu; then keys *=
    decay. Checked against the model after every offer: keys, count, offers, accepted, every
    filled slot's value, buf_sum, and the aggregate computed before the offer."""
    n, top_c, dtype, leaf_shapes, q, seed, offers, kappa, aggr = data.draw(admission_cases(synced))
    leaves = [torch.zeros(s, dtype=dtype) for s in leaf_shapes]
    state = cb.init(leaves, top_c, synced, None)
    rows = [Model(top_c, list(range(n)))] if synced else [Model(top_c, [i]) for i in range(n)]
    full_admitted = full_refused = 0
    for step, off in enumerate(offers):
        idx = [i for i in range(n) if off.present[i]]
        moved = [0] if synced else idx
        nu_of = {0: off.nus[0]} if synced else {i: off.nus[i] for i in idx}
        nu = torch.tensor([nu_of[r] for r in moved], dtype=state.keys.dtype)
        values = {i: float(1000 * (step + 1) + i + 1) for i in idx}
        xs = [torch.full(leaves[i].shape, values[i], dtype=dtype) for i in idx]
        row_of = (lambda i: 0) if synced else (lambda i: i)

        got_aggr = cb.aggregate(state, xs, idx, kappa, aggr)
        for i, a in zip(idx, got_aggr):
            want = rows[row_of(i)].aggregate(i, values[i], kappa, aggr)
            torch.testing.assert_close(a, torch.full_like(a, want), rtol=1e-6, atol=0, msg=f"step {step}: aggregate of leaf {i}")

        accepted_before = state.accepted.clone()
        state = cb.offer(state, xs, idx, nu, critical_test=q, seed=seed)
        state = cb.decay(state, idx, off.decay)
        for r in moved:
            model = rows[r]
            strict = model.strictly_admits(nu_of[r])
            admitted = bool(state.accepted[r] - accepted_before[r])
            if q == 0.0:
                assert admitted == strict, f"step {step} row {r}: admitted={admitted}, model says {strict}"
            elif q == 1.0:
                assert admitted, f"step {step} row {r}: critical_test=1 must admit"
            else:
                assert admitted or not strict, f"step {step} row {r}: the draw may only add admissions"
            if model.count == top_c:
                full_admitted, full_refused = full_admitted + admitted, full_refused + (not admitted)
            model.offer(nu_of[r], {i: values[i] for i in idx if row_of(i) == r}, admitted)
            model.decay(off.decay)

        for r, model in enumerate(rows):
            where = f"step {step} row {r}"
            assert state.keys[r].tolist() == model.keys, f"{where}: keys {state.keys[r].tolist()} != model {model.keys}"
            assert int(state.count[r]) == model.count, f"{where}: count"
            assert int(state.offers[r]) == model.offers and int(state.accepted[r]) == model.accepted, f"{where}: tallies"
        for i in range(n):
            model = rows[row_of(i)]
            for s in range(model.count):
                want = model.values[i][s] or 0.0
                assert torch.equal(state.buf[i][s], torch.full(leaves[i].shape, want, dtype=dtype)), (
                    f"step {step} leaf {i} slot {s}: {state.buf[i][s]} != model {want}"
                )
            assert torch.equal(state.buf_sum[i], torch.full(leaves[i].shape, model.buf_sum(i), dtype=dtype).double()), (
                f"step {step} leaf {i}: buf_sum {state.buf_sum[i]} != model {model.buf_sum(i)}"
            )
    ADMISSIONS.note(full_admitted, full_refused)
