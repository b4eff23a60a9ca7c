"""``memopt-func memory``: optimizer state bytes per parameter, measured from real state.

Each optimizer steps once on an MLP (64-512-512-10, 300k parameters, float32) with each storage
setting; the bytes of every tensor in ``optimizer.state_dict()["state"]`` are summed and divided by
the parameter count. Totals for a model of ``--params`` parameters are that figure times the count
(the MLP's few small tensors, kept at full precision under 8-bit storage, weigh a little more here
than in a large model). Published figures of other libraries' low-memory optimizers are listed
beside them for reference; they are quoted, not measured here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import catalog, common

SETTINGS = catalog.STORAGE
OPTIMIZERS = ("AdamW", "AdEMAMix", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C")
#: Each optimizer's buffer size here (the published defaults).
_EXTRA = {"Adam_CM": {"topC": 5}, "Adam_C": {"topC": 10}, "RMSprop_C": {"topC": 10}, "SGD_C": {"topC": 10, "momentum": 0.9}}


def _make(name: str, params, setting: str) -> torch.optim.Optimizer:
    return catalog.make_optimizer(name, params, storage=setting, **_EXTRA.get(name, {}))


#: Published state sizes of other libraries' optimizers, bytes per parameter (quoted).
ANCHORS = (
    ("torchao AdamW8bit", "8-bit", 2.03),
    ("torchao AdamW4bit", "4-bit", 1.06),
    ("bitsandbytes AdEMAMix8bit", "8-bit", 3.05),
    ("HeavyBall AdamW, storage_dtype=bfloat16", "bf16", 4.0),
)


@dataclass
class MemoryConfig:
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    params: float = 7e9
    out: Path = Path("memopt_out/memory")
    plot: bool = True


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def state_bytes_per_param(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> float:
    """Bytes of the optimizer's state_dict tensors per parameter, after one step on the MLP."""
    model = mlp()
    opt = make(list(model.parameters()))
    model(torch.randn(16, 64, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    opt.step()
    total = sum(
        v.numel() * v.element_size()
        for entry in opt.state_dict()["state"].values()
        for v in entry.values()
        if isinstance(v, torch.Tensor)
    )
    return total / sum(p.numel() for p in model.parameters())


def measure(cfg: MemoryConfig) -> list[dict]:
    rows = []
    for name in cfg.optimizers:
        for setting in cfg.settings:
            b = state_bytes_per_param(lambda ps: _make(name, ps, setting))
            rows.append({"optimizer": name, "storage": setting, "bytes_per_param": b, "total_gb": b * cfg.params / 1e9})
    return rows


def run(cfg: MemoryConfig, log: Callable[[str], None] = print) -> int:
    rows = measure(cfg)
    out = common.prepare_out(cfg.out)
    n = common.format_value(cfg.params)
    table = [[r["optimizer"], r["storage"], f"{r['bytes_per_param']:.2f}", f"{r['total_gb']:.1f}"] for r in rows]
    log(common.format_table(["optimizer", "storage", "B/param", f"GB at {n} params"], table, left=2))
    log("")
    log("published figures of other libraries (quoted, not measured here):")
    log(common.format_table(
        ["optimizer", "state", "B/param", f"GB at {n} params"],
        [[a, s, f"{b:.2f}", f"{b * cfg.params / 1e9:.1f}"] for a, s, b in ANCHORS], left=2,
    ))
    with open(out / "memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["optimizer", "storage", "bytes_per_param", "total_gb"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "memory.json").write_text(json.dumps({"params": cfg.params, "rows": rows, "anchors": ANCHORS}, indent=1))
    written = [out / "memory.csv", out / "memory.json"]
    if cfg.plot:
        written.append(_plot(rows, cfg, out))
    log("wrote " + ", ".join(str(p) for p in written))
    return 0


def _plot(rows: list[dict], cfg: MemoryConfig, out: Path) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(cfg.settings)
    for j, setting in enumerate(cfg.settings):
        values = [r["bytes_per_param"] for r in rows if r["storage"] == setting]
        xs = [i + (j - (len(cfg.settings) - 1) / 2) * width for i in range(len(cfg.optimizers))]
        ax.bar(xs, values, width, label=setting)
    ax.set_xticks(range(len(cfg.optimizers)), cfg.optimizers)
    ax.set_ylabel("state bytes per parameter")
    ax.set_title("optimizer state, measured from state_dict (MLP, 300k parameters, float32)")
    ax.legend(title="state / buffer storage")
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
