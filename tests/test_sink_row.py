"""A critical buffer with a sink row (``critical_buffer.with_sink``, what ``compiled.Stepper``
steps) computes the same bits as the plain ``[C, *shape]`` buffer: refused offers land in the
sink, which nothing reads, and the slots, keys and sums are those of the plain buffer.
"""

from __future__ import annotations

import pytest
import torch

from memopt_func.compiled import Stepper
from memopt_func import critical_buffer as cb
from memopt_func import rules
from helpers import assert_trees_bitwise_equal

CASES = {
    "Adam_C": dict(lr=1e-2, topC=2),
    "Adam_C-unsynced-mean": dict(lr=1e-2, topC=2, synced=False, aggr="mean"),
    "Adam_CM": dict(lr=1e-2, topC=2),
    "RMSprop_C": dict(lr=1e-3, topC=2),
    "SGD_C-draws": dict(lr=1e-2, topC=2, momentum=0.9, critical_test=0.3),
    "Adam_C-bf16-buffer": dict(lr=1e-2, topC=2, buffer_dtype=torch.bfloat16),
}


def _rule(case):
    return rules.RULES[case.split("-")[0]](**CASES[case])


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in [(3, 4), (5,), ()]]


def _grads(k):
    gen = torch.Generator().manual_seed(10 + k)
    # shrinking gradients: once the buffer is full, most offers are refused (their key is smaller)
    return [torch.randn(s, generator=gen) / (k + 1) ** 2 for s in [(3, 4), (5,), ()]]


def _map(state, fn):
    return state._replace(critical=fn(state.critical))


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
@pytest.mark.parametrize("case", list(CASES))
def test_sink_row_changes_no_bit_and_is_never_read(case, donate):
    rule = _rule(case)
    plain_p, sink_p = _params(), _params()
    plain = rule.init(plain_p)
    sink = _map(rule.init(sink_p), cb.with_sink)
    for k in range(8):
        # NaN in the sink before every step: it must never reach anything
        for b in sink.critical.buf:
            b[-1].fill_(float("nan"))
        plain_p, plain = rule.step(plain_p, _grads(k), plain, donate=donate)
        sink_p, sink = rule.step(sink_p, _grads(k), sink, donate=donate)
        assert_trees_bitwise_equal((sink_p, _map(sink, cb.without_sink)), (plain_p, plain), f"step {k + 1}")
    refused = int(plain.critical.offers.sum() - plain.critical.accepted.sum())
    assert refused > 0, "the run should include refused offers (the writes that go to the sink)"


def test_with_sink_pads_one_row_and_without_sink_gives_views_of_the_slots():
    rule = _rule("Adam_C")
    state = rule.init(_params()).critical
    padded = cb.with_sink(state)
    assert [tuple(b.shape) for b in padded.buf] == [(3, 3, 4), (3, 5), (3,)]
    slots = cb.without_sink(padded)
    assert [tuple(b.shape) for b in slots.buf] == [(2, 3, 4), (2, 5), (2,)]
    assert all(s.data_ptr() == p.data_ptr() for s, p in zip(slots.buf, padded.buf))


def test_stepper_state_shows_the_rule_layout():
    stepper = Stepper(_rule("Adam_C"), _params(), compile=False)
    assert [tuple(b.shape) for b in stepper.state.critical.buf] == [(2, 18)]
    assert [tuple(b.shape) for b in stepper.per_tensor_state().critical.buf] == [(2, 3, 4), (2, 5), (2,)]
