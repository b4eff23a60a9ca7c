"""Run from outside the checkout against an installed wheel: the package imports under its own
names only, and every optimizer steps, eager and compiled (``make wheel-check``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

import memopt_func
from memopt_func import compiled, optim

assert importlib.util.find_spec("compiled") is None, "the wheel must not install a top-level 'compiled'"
here = Path(memopt_func.__file__).resolve().parent
assert "site-packages" in str(here), f"memopt_func imported from {here}, not from the installed wheel"
assert (here / "py.typed").exists(), "py.typed is missing from the wheel"

for name in ("Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"):
    for module in (optim, compiled):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = getattr(module, name)(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):  # Adam_CM's first step only seeds its buffer
            opt.zero_grad()
            model(torch.randn(4, 3)).pow(2).mean().backward()
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), f"{module.__name__}.{name} did not step"
        print(f"{module.__name__}.{name}: steps ok")
print(f"memopt_func {memopt_func.__version__} from {here} with torch {torch.__version__} on Python {sys.version.split()[0]}")
