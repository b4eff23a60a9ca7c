"""CONTRIBUTING.md's worked example, run: a critical variant over an existing base rule, made as
the guide makes it (its rule class and one ``registry.register`` line), is a rule of the package,
a drop-in with the positional order it was given, a compiled twin, an entry of the apps'
catalog, and a rule the property suite draws; it keeps the core invariants of SPEC.md, and it
computes what the critical buffer over its base computes (``rules.with_critical_buffer``)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import memopt_func
from memopt_func import compiled, optim, registry, rules
from memopt_func._critical import CriticalRule, critical_hypers
from memopt_func.adam import AdamW
from memopt_func.apps import catalog

import test_prop_buffer_invariants as buffer_invariants
import test_prop_purity_resume as purity
from strategies import rule_hypers
from hypothesis import find


class AdamW_C(CriticalRule):
    """AdamW with critical gradients; ``kappa == 0`` or ``topC == 0`` is ``torch.optim.AdamW``."""

    BASE = AdamW
    HYPERS = AdamW.HYPERS + critical_hypers(top_c=10, aggr="sum")


@pytest.fixture
def registered():
    registry.register("AdamW_C", AdamW_C, registry.NAMED["Adam_C"].positional, "AdamW with critical gradients.")
    yield "AdamW_C"
    registry.unregister("AdamW_C")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 8) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 3, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_the_registry_line_makes_a_rule_a_drop_in_a_twin_and_a_catalog_entry(registered):
    assert rules.RULES[registered] is AdamW_C and rules.AdamW_C is AdamW_C
    dropin = optim.AdamW_C
    assert memopt_func.AdamW_C is dropin and optim.optimizer_class(AdamW_C) is dropin
    assert dropin.__name__ == registered and dropin.RULE is AdamW_C
    params = list(inspect.signature(dropin).parameters)
    assert params[1 : 1 + len(dropin.POSITIONAL)] == list(registry.NAMED["Adam_C"].positional)
    assert issubclass(compiled.AdamW_C, dropin) and compiled.AdamW_C.RULE is AdamW_C
    assert catalog.is_memory(registered)
    assert isinstance(catalog.make_optimizer(registered, _model().parameters(), lr=1e-3), dropin)
    hyper = find(rule_hypers(registered, buffer=True), lambda h: h["topC"] > 1)
    assert AdamW_C(**hyper).hyper["topC"] == hyper["topC"]


def test_it_computes_the_critical_buffer_over_its_base(registered):
    """The registered variant equals ``rules.with_critical_buffer(AdamW(...))`` bitwise, eager;
    its compiled twin to float rounding."""
    hyper = dict(lr=1e-2, weight_decay=0.05, topC=3, decay=0.9)
    a, b, c = _model(), _model(), _model()
    _train(optim.AdamW_C(a.parameters(), **hyper), a)
    combined = rules.with_critical_buffer(rules.AdamW(lr=1e-2, weight_decay=0.05), topC=3, decay=0.9)
    _train(optim.from_rule(b.parameters(), combined), b)
    _train(compiled.AdamW_C(c.parameters(), **hyper), c)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(r, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "invariant",
    [
        buffer_invariants.test_invariant_count_le_topC_and_count_eq_min_k_topC,
        buffer_invariants.test_invariant_buf_sum_equals_sum_of_filled_slots,
        buffer_invariants.test_invariant_keys_decay_and_written_key_is_nu_times_decay,
        buffer_invariants.test_invariant_every_stored_slot_was_offered_no_mixing,
        purity.test_invariant_purity_inputs_never_mutated_and_outputs_deterministic,
        purity.test_invariant_resume_equivalence_save_load_bit_identical,
    ],
    ids=lambda f: f.__name__,
)
def test_it_keeps_the_core_invariants(registered, invariant):
    invariant(name=registered)


def test_every_rule_of_the_package_is_drawn_by_the_property_suite():
    """The suite's rule tables come from the registry, and each rule's hyperparameters can be
    drawn (a registered rule whose base has no strategy fails here, naming it)."""
    from strategies import ALL_RULES, NAMED_CRITICAL_RULES

    assert set(ALL_RULES) == set(rules.RULES)
    assert set(NAMED_CRITICAL_RULES) == {n for n, cls in rules.RULES.items() if issubclass(cls, CriticalRule)}
    for name in rules.RULES:
        hyper = find(rule_hypers(name), lambda h: True)
        rules.RULES[name](**hyper)


def test_the_demo_runs_a_registered_rule_it_has_no_settings_for(registered, tmp_path):
    from memopt_func.apps import demo

    cfg = demo.DemoConfig(optimizers=[registered], steps=4, n_train=64, n_val=32, batch_size=16, hidden=8, eval_every=2, out=tmp_path, progress=False)
    assert demo.run(cfg, log=lambda _: None) == 0
    assert demo.demo_hyper(registered) == {"lr": 1e-3}
