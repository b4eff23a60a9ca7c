"""A control for the storage speed table: the smallest AdamW step, written by hand, compiled by
Inductor with its moments stored in float32 or bfloat16 (no library code involved).

    python bench/bf16_kernel.py [--sizes 250000,4000000,20000000] [--steps 40]

If a bfloat16-state step is slower here too, the cost sits in the generated code for the
conversions, not in how memopt_func lays out or rounds its state. Each cell runs in a fresh
process; the table gives the median step and the ratio to float32 at the same size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cells import run_cell  # noqa: E402
from memopt_func.apps.benchmarking import time_steps  # noqa: E402


def adamw_step(p, g, m, v, b1: float, b2: float, lr: float, eps: float) -> None:
    mf, vf = m.float(), v.float()
    mf = mf + (g - mf) * (1 - b1)
    vf = vf * b2 + g * g * (1 - b2)
    p.sub_(lr * mf / (vf.sqrt() + eps))
    m.copy_(mf.to(m.dtype))
    v.copy_(vf.to(v.dtype))


def cell(numel: int, dtype_name: str, steps: int) -> dict:
    """The median compiled ``adamw_step`` in seconds with m and v stored as ``dtype_name``, after
    5 warm-up steps. Run it through ``run_cell``: Inductor compiles afresh in each process."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
    m, v = torch.randn(numel, generator=gen).to(dtype), torch.rand(numel, generator=gen).to(dtype)
    step = torch.compile(adamw_step)
    times = time_steps(lambda: step(p, g, m, v, 0.9, 0.999, 1e-3, 1e-8), warmup=5, repeats=steps)
    return {"numel": numel, "dtype": dtype_name, "median_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="250000,4000000,20000000")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| elements | float32 ms | bfloat16 ms | bf16 / fp32 | bytes bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for numel in (int(s) for s in args.sizes.split(",")):
        out = {name: run_cell(cell, numel, name, args.steps)["median_s"] for name in ("float32", "bfloat16")}
        # p read and written, g read (4 B each), m and v read and written at the stored width
        ratio_bytes = (12 + 4 * 2) / (12 + 4 * 4)
        print(
            f"| {numel:,} | {out['float32'] * 1e3:.3f} | {out['bfloat16'] * 1e3:.3f} | "
            f"{out['bfloat16'] / out['float32']:.2f} | {ratio_bytes:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
