"""SPEC.md "Invariants" of the critical buffer, checked after every step of every rule that keeps
one (``strategies.CRITICAL_RULES``): the package's four (SGD_C, Adam_C, RMSprop_C, Adam_CM) and
the buffer put over AdEMAMix, AdamW and RMSprop with ``rules.with_critical_buffer`` (SPEC.md
section 8.3; named "AdEMAMix+buffer", "AdamW+buffer", "RMSprop+buffer", with drawn base and
critical hyperparameters, ``maximize`` included), on hypothesis-drawn pytrees, gradient streams
and hyperparameters (a buffer always exists here: kappa > 0 and topC >= 1).

The cases make the buffer decide: decays mostly near 1, streams long enough to fill it whose
scale grows and shrinks, per-leaf scale patterns that change from step to step, trees with runs
of equal-sized tensors. Each property asserts (``sees_admissions_and_refusals``) that enough of
its examples saw a full buffer both admit and refuse.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

from harness import (
    ADMISSIONS,
    bit_equal,
    bits,
    clone,
    eps_of,
    make_rule,
    nu_reference,
    row_of,
    rows_moved,
    run_stream,
    sees_admissions_and_refusals,
)
from strategies import CRITICAL_RULES, decay_overrides, flat, grad_streams, rule_hypers, trees


# Share of a property's examples that must see a full buffer both admit and refuse. More than
# half do with these strategies; the rest are the edge values (decay far below 1: admitted
# only; critical_test = 1) and the minimal examples hypothesis tries first.
MIN_DECIDING_SHARE = 0.12


@st.composite
def critical_cases(draw, name: str, *, allow_none: bool | None = None, extra_steps: int = 10):
    """(hyper, tree, stream) with a buffer that has to decide (see the module docstring): the
    stream fills it and then offers 3 to ``extra_steps`` more; decay sometimes overridden per step."""
    tree = draw(trees(low_precision=True, max_leaves=6, runs=draw(st.booleans())))
    hyper = draw(rule_hypers(name, buffer=True, low_precision=tree.low_precision, deciding=True))
    stream = draw(
        grad_streams(
            tree.n,
            min_steps=hyper["topC"] + 3,
            max_steps=hyper["topC"] + extra_steps,
            low_precision=tree.low_precision,
            allow_none=True if allow_none is None else allow_none,
            per_step=decay_overrides(deciding=True),
            tensor_per_step=True,
            walk=draw(st.integers(0, 3)) != 0,
            leaf_scales=True,
        )
    )
    return hyper, tree, stream


def _first_argmin(row: torch.Tensor) -> int:
    vals = row.tolist()
    return vals.index(min(vals))


def _written_slot(crit_before, r: int, top_c: int) -> int:
    """SPEC "Offering a value": the next empty slot, else the first argmin of the keys."""
    cnt = int(crit_before.count[r])
    return cnt if cnt < top_c else _first_argmin(crit_before.keys[r])


def _admitted(rec, r: int) -> bool:
    return int(rec.state_after.critical.accepted[r] - rec.state_before.critical.accepted[r]) == 1


def _decay_of(rec, hyper):
    return rec.plan.kwargs().get("decay", hyper["decay"])


# --------------------------------------------------------------------------- count


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(data=st.data())
def test_invariant_count_le_topC_and_count_eq_min_k_topC(name, data):
    """Invariant "count <= topC always; after a group's k-th step, count == min(k, topC)".

    Synced: k counts the group's steps where at least one gradient is present (one row).
    Unsynced: per leaf, k counts the steps where that leaf had a gradient. Also: ``offers``
    counts the same k, and ``accepted`` never exceeds it.
    """
    hyper, tree, stream = data.draw(critical_cases(name))
    rule = make_rule(name, hyper)
    records = run_stream(rule, tree, stream)
    top_c, synced = hyper["topC"], hyper["synced"]
    ADMISSIONS.note_records(records, synced)
    rows = 1 if synced else tree.n
    k = [0] * rows
    init = rule.init(tree.build()).critical
    assert init.count.dtype == torch.int64 and init.count.tolist() == [0] * rows
    assert tuple(init.keys.shape) == (rows, top_c)
    for rec in records:
        for r in rows_moved(synced, rec.plan.present):
            k[r] += 1
        crit = rec.state_after.critical
        count = crit.count.tolist()
        assert crit.count.dtype == torch.int64 and len(count) == rows
        assert all(0 <= c <= top_c for c in count), f"step {rec.k}: count {count} outside 0..{top_c}"
        assert count == [min(kr, top_c) for kr in k], f"step {rec.k}: count {count}, k {k}, topC {top_c}"
        assert crit.offers.tolist() == k
        assert all(a <= o for a, o in zip(crit.accepted.tolist(), crit.offers.tolist()))


# --------------------------------------------------------------------------- buf_sum


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(data=st.data())
def test_invariant_buf_sum_equals_sum_of_filled_slots(name, data):
    """Invariant "buf_sum equals the sum of the filled slots (to rounding)".

    buf_sum is float64, kept as ``buf_sum += x - buf[slot]`` for narrower slots (exact while the
    values span less than about 2**27) and summed afresh for float64 slots; the bound allowed is
    ``4 * eps(float64) * (writes + 1) * (topC + 1) * max|value ever stored|``. buf is in
    buffer_dtype (default: the parameter's dtype).
    """
    hyper, tree, stream = data.draw(critical_cases(name))
    rule = make_rule(name, hyper)
    records = run_stream(rule, tree, stream)
    synced, top_c = hyper["synced"], hyper["topC"]
    ADMISSIONS.note_records(records, synced)
    writes = [0] * tree.n
    biggest = [0.0] * tree.n
    for rec in records:
        crit = rec.state_after.critical
        for i, p in enumerate(rec.params_before):
            buf, total = crit.buf[i], crit.buf_sum[i]
            assert buf.dtype == (hyper["buffer_dtype"] or p.dtype), f"buf[{i}] dtype {buf.dtype}"
            assert tuple(buf.shape) == (top_c, *p.shape)
            assert total.dtype == torch.float64 and total.shape == p.shape, f"buf_sum[{i}] {total.dtype} {total.shape}"
            r = row_of(synced, i)
            if rec.plan.present[i] and _admitted(rec, r):
                writes[i] += 1
            if buf.numel():
                biggest[i] = max(biggest[i], buf.double().abs().max().item())
            if not math.isfinite(biggest[i]):
                continue  # an overflowed low-precision run: nothing left to compare
            filled = int(crit.count[r])
            expected = buf[:filled].double().sum(0)
            tol = 4 * eps_of(total.dtype) * (writes[i] + 1) * (top_c + 1) * biggest[i]
            err = (total.double() - expected).abs()
            assert err.numel() == 0 or err.max().item() <= tol, (
                f"step {rec.k} leaf {i}: |buf_sum - sum(buf[:{filled}])| = {err.max().item():.3g} > {tol:.3g}\n"
                f"buf_sum={total}\nsum={expected}"
            )


# --------------------------------------------------------------------------- unfilled slots


def _poison_unfilled(state, synced: bool):
    """A copy of the state with NaN in every unfilled slot of every buffer and key row."""
    crit = state.critical
    count = crit.count.tolist()
    keys = crit.keys.clone()
    for r, c in enumerate(count):
        keys[r, c:] = float("nan")
    buf = []
    for i, b in enumerate(crit.buf):
        b = b.clone()
        b[count[row_of(synced, i)] :] = float("nan")
        buf.append(b)
    return state._replace(critical=crit._replace(keys=keys, buf=tuple(buf)))


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(data=st.data())
def test_invariant_unfilled_slots_are_never_read(name, data):
    """Invariant "unfilled slots are never read" (the second half of the buf_sum invariant).

    From a hypothesis-chosen step on, the run is repeated with NaN written into every unfilled
    slot (slot index >= count) of the buffers and keys; params, base state, count/offers/accepted,
    buf_sum and the filled slots and their keys must stay bit-identical to the clean run.
    (Synced runs use streams without None leaves: in synced mode a leaf skipped while the group
    fills a slot keeps that slot's old content, which then *is* a filled slot by the group count.)
    """
    tree = data.draw(trees(low_precision=True, max_leaves=6, runs=data.draw(st.booleans())), label="tree")
    hyper = data.draw(rule_hypers(name, buffer=True, low_precision=tree.low_precision, deciding=True), label="hyper")
    synced = hyper["synced"]
    stream = data.draw(
        grad_streams(
            tree.n, min_steps=hyper["topC"] + 3, max_steps=hyper["topC"] + 10, low_precision=tree.low_precision,
            allow_none=not synced, per_step=decay_overrides(deciding=True), walk=data.draw(st.integers(0, 3)) != 0, leaf_scales=True,
        ),
        label="stream",
    )
    # unfilled slots exist while the buffer fills: poison before it is full, now and then later
    last = len(stream) - 1
    filling = st.integers(0, min(last, hyper["topC"] - 1))
    start = data.draw(st.one_of(filling, filling, st.integers(0, last)), label="poison before step")
    rule = make_rule(name, hyper)
    clean = run_stream(rule, tree, stream)
    ADMISSIONS.note_records(clean[start:], synced)
    _, spec = flat(tree.build())
    first = clean[start]
    poisoned = _poison_unfilled(first.state_before, synced)
    dirty = run_stream(rule, tree, stream[start:], state=poisoned, params=pytree.tree_unflatten(clone(first.params_before), spec))
    for a, b in zip(clean[start:], dirty):
        where = f"step {a.k} (poisoned before step {start})"
        for i, (x, y) in enumerate(zip(a.params_after, b.params_after)):
            assert bit_equal(x, y), f"{where}: params leaf {i} differ\nclean={x}\npoisoned={y}"
        ca, cb_ = a.state_after.critical, b.state_after.critical
        assert ca.count.tolist() == cb_.count.tolist() and ca.offers.tolist() == cb_.offers.tolist()
        assert ca.accepted.tolist() == cb_.accepted.tolist(), f"{where}: admissions differ"
        for i in range(tree.n):
            assert bit_equal(ca.buf_sum[i], cb_.buf_sum[i]), f"{where}: buf_sum[{i}] differs\nclean={ca.buf_sum[i]}\npoisoned={cb_.buf_sum[i]}"
            filled = int(ca.count[row_of(synced, i)])
            assert bit_equal(ca.buf[i][:filled], cb_.buf[i][:filled]), f"{where}: filled slots of buf[{i}] differ"
        for r, c in enumerate(ca.count.tolist()):
            assert bit_equal(ca.keys[r, :c], cb_.keys[r, :c]), f"{where}: keys of filled slots differ in row {r}"
        for x, y in zip(pytree.tree_leaves(a.state_after.base), pytree.tree_leaves(b.state_after.base)):
            assert bit_equal(x, y), f"{where}: base state differs"


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(data=st.data())
def test_invariant_keys_decay_and_written_key_is_nu_times_decay(name, data):
    """Invariant "keys of slots not written this step are exactly decay times their previous
    value (monotone non-increasing for decay <= 1); a written key equals that step's nu times decay".

    nu (float64 reference): the sum of the present leaves' gradient L2 norms when synced, the
    leaf's own norm otherwise; always of the raw gradient. Rows a step does not move (unsynced,
    None gradient) keep their keys bit for bit. With critical_test == 0 the admission itself is
    checked against SPEC (not full: admitted; full: admitted iff nu > key at the first argmin),
    up to the rounding of the reference nu; with critical_test == 1 every offer is admitted.
    """
    hyper, tree, stream = data.draw(critical_cases(name))
    rule = make_rule(name, hyper)
    records = run_stream(rule, tree, stream)
    synced, top_c, q = hyper["synced"], hyper["topC"], hyper["critical_test"]
    ADMISSIONS.note_records(records, synced)
    for rec in records:
        before, after = rec.state_before.critical, rec.state_after.critical
        key_dtype = before.keys.dtype
        assert after.keys.dtype == key_dtype
        assert key_dtype == (torch.float64 if torch.float64 in tree.dtypes else torch.float32)
        rtol = 1e-12 if key_dtype == torch.float64 else 1e-5
        atol = 4 * torch.finfo(key_dtype).tiny
        decay = _decay_of(rec, hyper)
        decay_f = float(decay)
        decayed = before.keys * decay  # the exact product SPEC asks for, in the keys' dtype
        nu = nu_reference(rec.grads, synced)
        moved = rows_moved(synced, rec.plan.present)
        for r in range(before.keys.shape[0]):
            where = f"step {rec.k} row {r}"
            if r not in moved:
                assert bit_equal(after.keys[r], before.keys[r]), f"{where}: a row no gradient touched changed"
                continue
            admitted = _admitted(rec, r)
            slot = _written_slot(before, r, top_c)
            full = int(before.count[r]) >= top_c
            if not full or q == 1.0:
                assert admitted, f"{where}: offer refused (full={full}, critical_test={q})"
            elif q == 0.0:
                key = before.keys[r, slot].item()
                if nu[r] > key * (1 + rtol) + atol:
                    assert admitted, f"{where}: nu={nu[r]!r} > key={key!r} but refused"
                if nu[r] < key * (1 - rtol) - atol:
                    assert not admitted, f"{where}: nu={nu[r]!r} < key={key!r} but admitted"
            for j in range(top_c):
                got = after.keys[r, j]
                if admitted and j == slot:
                    want = nu[r] * decay_f
                    assert abs(got.item() - want) <= rtol * abs(want) + atol, (
                        f"{where}: written key {got.item()!r} != nu*decay = {nu[r]!r}*{decay_f!r} = {want!r}"
                    )
                else:
                    assert bit_equal(got, decayed[r, j]), (
                        f"{where} slot {j}: key {got.item()!r} != decay*previous = {decayed[r, j].item()!r}"
                    )
                    assert got.item() <= before.keys[r, j].item(), f"{where} slot {j}: key grew"


# --------------------------------------------------------------------------- no mixing


def _offered_values(name, hyper, rec, m_track):
    """SPEC's offered value per present leaf (float, parameter dtype) for this step; updates
    the independently tracked Adam_CM momentum. With ``maximize`` (drawn for the combined
    rules) ``g`` is ``-grad`` (SPEC 1, 2.6)."""
    synced = hyper["synced"]
    out = {}
    for i, g in enumerate(rec.grads):
        if g is None:
            continue
        if hyper.get("maximize"):
            g = -g
        if name == "SGD_C":
            wd = hyper["weight_decay"]
            # as torch.optim.SGD (and the published SGD_C) write it: one fused add with alpha
            out[i] = g if wd == 0 else torch.add(g, rec.params_before[i], alpha=wd)
        elif name == "Adam_CM":
            if int(rec.state_before.critical.count[row_of(synced, i)]) == 0:
                out[i] = g  # seeding step: the raw gradient; m stays as it is
            else:
                m_track[i] = torch.lerp(m_track[i], g, 1 - hyper["betas"][0])
                out[i] = m_track[i]
        else:
            out[i] = g
    return out


@pytest.mark.parametrize("name", CRITICAL_RULES)
@sees_admissions_and_refusals(MIN_DECIDING_SHARE)
@given(data=st.data())
def test_invariant_every_stored_slot_was_offered_no_mixing(name, data):
    """Invariant "every stored slot is a value that was offered at some step (no mixing)".

    Offered values are recomputed independently: the gradient (Adam_C, RMSprop_C, and the
    combined rules "<Base>+buffer" of SPEC 8.3, whatever moments their base keeps; ``-grad``
    with maximize), the weight-decayed gradient ``g + weight_decay*p`` (SGD_C, as ``torch.add(g, p, alpha=weight_decay)``), and for Adam_CM the raw gradient on
    the seeding step, then the plain momentum ``m = lerp(m, g, 1 - b1)`` (also checked to be the
    stored ``exp_avg``). Each filled slot must equal one of them bit for bit in buffer_dtype; the
    slot written this step must hold this step's value and every other slot must be unchanged.
    (Synced with None leaves: a leaf skipped while the group filled a new slot keeps the zero
    it was initialised with there, so zero also counts as offered for that leaf.)
    """
    hyper, tree, stream = data.draw(critical_cases(name))
    rule = make_rule(name, hyper)
    records = run_stream(rule, tree, stream)
    synced, top_c = hyper["synced"], hyper["topC"]
    ADMISSIONS.note_records(records, synced)
    leaves0 = records[0].params_before
    m_track = [torch.zeros_like(p) for p in leaves0]
    offered: list[list[torch.Tensor]] = [[] for _ in leaves0]
    for rec in records:
        before, after = rec.state_before.critical, rec.state_after.critical
        values = _offered_values(name, hyper, rec, m_track)
        if name == "Adam_CM":
            for i in values:
                assert bit_equal(rec.state_after.base.exp_avg[i], m_track[i]), (
                    f"step {rec.k} leaf {i}: stored momentum is not lerp(m, g, 1-b1)"
                )
        for i in range(tree.n):
            r = row_of(synced, i)
            buf_dtype = after.buf[i].dtype
            slot = _written_slot(before, r, top_c)
            admitted = r in rows_moved(synced, rec.plan.present) and _admitted(rec, r)
            if i in values:
                offered[i].append(bits(values[i].to(buf_dtype)))
            elif synced and admitted and int(before.count[r]) < top_c:
                offered[i].append(bits(torch.zeros_like(after.buf[i][0])))
            for j in range(top_c):
                got = after.buf[i][j]
                where = f"step {rec.k} leaf {i} slot {j}"
                if admitted and j == slot and i in values:
                    assert bit_equal(got, values[i].to(buf_dtype)), f"{where}: written slot != this step's offered value"
                else:
                    assert bit_equal(got, before.buf[i][j]), f"{where}: a slot not written this step changed"
                if j < int(after.count[r]):
                    assert any(torch.equal(bits(got), o) for o in offered[i]), (
                        f"{where}: stored value was never offered (mixing?)\n{got}"
                    )
