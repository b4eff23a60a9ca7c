"""Each drop-in trains a small MLP on a synthetic regression task to a loss target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropin_common import dropin

STEPS = 120
SETTINGS = {
    "Adam_CM": dict(lr=3e-3, topC=5),
    "Adam_CM-unsynced-wd": dict(lr=3e-3, topC=5, synced=False, weight_decay=0.01),
    "Adam_C": dict(lr=1e-2, topC=5),
    "RMSprop_C": dict(lr=3e-3, topC=5),
    "SGD_C": dict(lr=5e-2, topC=5),
    "SGD_C-momentum": dict(lr=5e-3, topC=5, momentum=0.9),
    "AdEMAMix": dict(lr=1e-2, beta3_warmup=50, alpha_warmup=50),
    "AdEMAMix_C": dict(lr=1e-2, topC=5, beta3_warmup=50, alpha_warmup=50),
}


def _task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 4, generator=gen)
    w = torch.randn(4, 1, generator=gen)
    return x, torch.tanh(x @ w)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_trains_mlp_to_loss_target(setting):
    name = setting.split("-")[0]
    x, y = _task()
    model = _model()
    opt = dropin(name)(model.parameters(), **SETTINGS[setting])
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.2 * initial, f"{setting}: loss {initial:.4f} -> {final:.4f}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
