"""The speed baseline computes what SPEC.md says, so the comparison is like for like."""

import pytest
import torch

from memopt_func import optim
from published_style import PUBLISHED_STYLE


@pytest.mark.parametrize("name", sorted(PUBLISHED_STYLE))
def test_published_style_matches_the_dropin(name):
    extra = {"SGD_C": dict(momentum=0.9, dampening=0.1)}.get(name, {})
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = getattr(optim, name)(a, lr=1e-2, topC=3, weight_decay=0.1, **extra)
    theirs = PUBLISHED_STYLE[name](b, lr=1e-2, topC=3, weight_decay=0.1, **extra)
    for k in range(20):
        gen = torch.Generator().manual_seed(k)
        scale = 10 ** (2 * torch.rand((), generator=gen).item() - 1)
        for p, q in zip(a, b):
            p.grad = scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        assert ((p - q).abs().max() / q.abs().max()).item() < 1e-12
