"""A flat Stepper over runs of equal-sized tensors, where the synced critical buffer has to choose.

The flat layout orders a buffer's tensors by size, so equal sizes form runs ``(count, numel)``
and the priority takes one ``[count, numel]`` reduction per run. SPEC's synced priority is the
sum of the per-tensor norms; one norm over a whole run (the norm of the sum) ranks steps
differently as soon as the tensors' scales differ from step to step. With a decay near 1 keys
outlive several steps, so a full buffer refuses as well as admits, and a wrong ranking changes
which gradients it keeps. (At decay 0.7, and with models whose weights and biases alternate in
size, almost every offer is admitted and runs longer than one are rare: such a bug goes unseen.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memopt_func import rules
from memopt_func.compiled import Stepper

STEPS = 30
# Per step, each layer's gradient scale is 10**u with u drawn in [-1, 1]: the layers' shares of
# the priority change from step to step, and the overall scale shrinks as well as grows.
LOG10_SPREAD = 1.0


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(16, 16, bias=False) for _ in range(3)))


def _grads(k: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + k)
    scales = 10 ** (LOG10_SPREAD * (2 * torch.rand(len(params), generator=gen, dtype=torch.float64) - 1))
    return [float(s) * torch.randn(p.shape, generator=gen) for s, p in zip(scales, params)]


@pytest.mark.parametrize("compile", [False, True], ids=["flat-eager", "flat-compiled"])
def test_flat_stepper_over_bias_free_layers_equals_eager_rule_when_the_buffer_decides(compile):
    """Adam_C (topC=2, decay=0.99, synced) on three bias-free 16x16 Linear layers: a Stepper
    (flat layout: one run of three 256-element tensors) against the eager rule on separate
    leaves, 30 steps. The buffer's decisions (admitted offer counts, keys) match, the run saw
    both replacements and refusals of a full buffer, and the parameters agree to 1e-5 relative."""
    torch._dynamo.reset()
    rule = rules.Adam_C(lr=1e-2, topC=2, decay=0.99)
    model = _model()
    reference = [p.detach().clone() for p in model.parameters()]
    state = rule.init(reference)
    stepper = Stepper(rule, dict(model.named_parameters()), compile=compile)
    assert stepper.flat and stepper.layout.runs == [((3, 256),)]
    refused = replaced = 0
    for k in range(STEPS):
        grads = _grads(k, reference)
        before = state.critical
        stepper.step(dict(zip(dict(model.named_parameters()), grads)))
        reference, state = rule.step(reference, grads, state)
        if int(before.count[0]) == 2:
            took = int(state.critical.accepted[0] - before.accepted[0])
            replaced, refused = replaced + took, refused + 1 - took
        got = stepper.per_tensor_state().critical
        assert got.accepted.tolist() == state.critical.accepted.tolist(), f"step {k + 1}: admissions differ from eager"
        torch.testing.assert_close(got.keys, state.critical.keys, rtol=1e-5, atol=0, msg=f"step {k + 1}: keys")
    assert replaced >= 2 and refused >= 10, f"the full buffer must choose: {replaced} replaced, {refused} refused"
    for name, (a, b) in zip(("0", "1", "2"), zip(model.parameters(), reference)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, f"layer {name}: flat stepper is {err:.3g} (relative) away from the eager rule"
