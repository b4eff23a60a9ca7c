"""SPEC.md (2026-12-07) "Every earlier checkpoint format of the project loads and resumes exactly",
and "No two tensors (or fields, or steps) share a random stream; pinned draws do not change", as
properties over the golden corpus (tests/golden/, see tests/golden_corpus.py) and the streams.

A golden checkpoint is loaded into today's optimizer, stepped part of its continuation, saved in
today's format through ``torch.save`` / ``torch.load(weights_only=True)``, loaded into a fresh
optimizer, and stepped the rest: the old version's own continuation, to 1e-9 relative.
"""

from __future__ import annotations

import io
import os
import sys

import torch
from hypothesis import given
from hypothesis import strategies as st

import memopt_func.compiled as compiled
from memopt_func import optim, rules
from memopt_func import storage as S

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from golden_corpus import GOLDEN, make_optimizer, make_stepper, relative_errors, run, skipping  # noqa: E402

FILES = sorted(
    os.path.join(root, f) for root, _, names in os.walk(GOLDEN) for f in names if f.endswith(".pt")
)


def _fresh(case, params):
    how = case["how"]
    if how == "stepper":
        return make_stepper(rules, compiled, case["class"], params, case["kwargs"], compile=False)
    cls = getattr(optim, case["class"])  # a compiled drop-in's state_dict resumes in the eager one
    return make_optimizer(cls, params, {"lr": 0.5}, "groups" if how == "groups" else "eager")


@given(path=st.sampled_from(FILES), split=st.integers(0, 4))
def test_invariant_every_earlier_checkpoint_format_loads_and_resumes_exactly(path, split):
    case = torch.load(path, weights_only=True)
    start, after, how = case["before"], case["after"], case["how"]
    split = min(split, after)
    params = [torch.nn.Parameter(p.clone()) for p in case["params_at_save"]]
    opt = _fresh(case, params)
    opt.load_state_dict(case["state_dict"])
    run(opt, params, range(start, start + split), skipping(how))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = _fresh(case, params)
    again.load_state_dict(torch.load(buf, weights_only=True))
    run(again, params, range(start + split, start + after), skipping(how))
    for i, err in enumerate(relative_errors(params, case["params_after"])):
        assert err <= 1e-9, f"{os.path.relpath(path, GOLDEN)}, resaved after {split}: parameter {i} is {err:.3g} off"


@given(
    fields=st.lists(st.sampled_from(sorted(S.STREAM_ID)), min_size=2, max_size=2, unique=True),
    positions=st.lists(st.integers(0, 10_000), min_size=2, max_size=2, unique=True),
    steps=st.lists(st.integers(1, 2**31 - 1), min_size=2, max_size=2, unique=True),
    seed=st.integers(0, 2**63 - 1),
)
def test_invariant_no_two_tensors_fields_or_steps_share_a_random_stream(fields, positions, steps, seed):
    """Changing any one of (step, field, tensor position) gives other draws for the same elements."""
    x = torch.zeros(64)
    base = S.random_uniform(x, seed, torch.tensor(steps[0]), fields[0], positions[0])
    for step, field, position in (
        (steps[1], fields[0], positions[0]),
        (steps[0], fields[1], positions[0]),
        (steps[0], fields[0], positions[1]),
    ):
        other = S.random_uniform(x, seed, torch.tensor(step), field, position)
        assert not torch.equal(base, other), (step, field, position)
