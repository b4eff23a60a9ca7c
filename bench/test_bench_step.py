"""pytest-benchmark: one optimizer step per rule, size and mode.

    make bench            # pytest bench --benchmark-enable --benchmark-only

Under `make test` (--benchmark-disable) each body runs once as a smoke test. The side-by-side
table with roofline fractions comes from bench/roofline.py; RESULTS.md records it.
"""

from __future__ import annotations

import pytest
import torch

from memopt_func.compiled import Stepper
from memopt_func import optim, rules

SIZES = {"20x10k": [(10_000,)] * 20, "4x250k": [(250_000,)] * 4}
RULES = ["Adam", "AdamW", "SGD", "RMSprop", "Adam_C", "RMSprop_C", "SGD_C", "Adam_CM", "AdEMAMix"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", RULES)
def test_compiled_step(benchmark, name, size):
    stepper = Stepper(rules.RULES[name](), [torch.randn(s) for s in SIZES[size]])
    for g in stepper._grads:
        g.normal_()
    stepper.step(stepper._grad_views)
    benchmark(stepper.step, stepper._grad_views)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", RULES)
def test_eager_step(benchmark, name, size):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SIZES[size]]
    for p in params:
        p.grad = torch.randn_like(p)
    if hasattr(optim, name):
        opt = getattr(optim, name)(params)
    else:
        opt = getattr(torch.optim, name)(params, foreach=True)
    opt.step()
    benchmark(opt.step)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_torch_optim_step(benchmark, name, size):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SIZES[size]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = getattr(torch.optim, name)(params, foreach=True)
    opt.step()
    benchmark(opt.step)
