"""How far ``buf_sum`` drifts from the sum of the filled slots over a long run.

A stream of gradients whose scale falls geometrically (default: 1e2 to 1e-4 over 20k steps, the
case SPEC.md's "Exact buffer sums" names) is fed to Adam_C's functional rule (topC 5, float32);
the report is max |buf_sum - sum(filled slots)| / sum |filled slots| over the run's last steps,
the slots summed in float64.

    python bench/buf_sum_drift.py [--steps 20000] [--numel 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memopt_func import rules  # noqa: E402


def drift(steps: int, numel: int, dtype: torch.dtype, top: float = 1e2, bottom: float = 1e-4, seed: int = 0) -> float:
    """The worst relative drift of buf_sum over the last tenth of the run."""
    gen = torch.Generator().manual_seed(seed)
    rule = rules.Adam_C(lr=1e-3, topC=5, decay=0.99)
    params = [torch.zeros(numel, dtype=dtype)]
    state = rule.init(params)
    worst = 0.0
    for k in range(steps):
        scale = top * (bottom / top) ** (k / max(steps - 1, 1))
        g = (torch.randn(numel, generator=gen, dtype=torch.float64) * scale).to(dtype)
        params, state = rule.step(params, [g], state, donate=True)
        if k >= steps - steps // 10:
            crit = state.critical
            filled = int(crit.count[0])
            slots = crit.buf[0][:filled].to(torch.float64)
            exact = slots.sum(0)
            err = (crit.buf_sum[0].to(torch.float64) - exact).abs().max().item()
            worst = max(worst, err / max(slots.abs().sum(0).max().item(), math.ulp(0.0)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--numel", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    args = ap.parse_args()
    d = drift(args.steps, args.numel, getattr(torch, args.dtype))
    print(f"steps {args.steps}, numel {args.numel}, {args.dtype}: worst relative drift of buf_sum {d:.3e}")


if __name__ == "__main__":
    main()
