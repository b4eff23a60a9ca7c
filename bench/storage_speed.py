"""Compiled step time with narrower optimizer state, side by side (each cell in a fresh process).

    python bench/storage_speed.py [--shape 20x1000000] [--steps 30] [--rules AdamW,AdEMAMix,Adam_CM]

For each rule, a compiled ``Stepper`` over float32 parameters with the state stored as: fp32
(today's flat stepper), bf16 rounded to nearest (flat), bf16 rounded stochastically and int8
(both kept per tensor: their random draws and 8-bit blocks are per tensor). Bytes per step are
what the update must move at that storage: parameters read and written, gradients read, each
moment read and written at its stored width (8-bit: one byte plus a float32 scale per 256), the
critical buffer as the one slot written. An 8-bit critical buffer is read whole each step (its
sum is recomputed from the slots, and a written slot is found by comparing), which the
roofline here does not count. The roofline time uses the copy bandwidth measured in each cell's process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cells import CellFailed, run_cell  # noqa: E402

SETTINGS = {
    "fp32": dict(),
    "bf16-nearest": dict(state_dtype=torch.bfloat16, rounding="nearest"),
    "bf16-stochastic": dict(state_dtype=torch.bfloat16),
    "int8": dict(state_dtype=torch.int8),
}
BUFFER = {"bf16-nearest": torch.bfloat16, "bf16-stochastic": torch.bfloat16, "int8": torch.int8}
WIDTH = {"fp32": 4.0, "bf16-nearest": 2.0, "bf16-stochastic": 2.0, "int8": 1.0 + 4 / 256}


def cell(rule_name: str, setting: str, shape: str, steps: int) -> dict:
    """One rule at one storage setting: the compiled ``Stepper``'s first step in seconds, its
    median step after 5 more, the bytes it must move and the streaming bandwidth measured here.
    Run it through ``run_cell``: each cell compiles in its own process."""
    from memopt_func import rules
    from memopt_func.apps.benchmarking import stream_bandwidth, time_once, time_steps
    from memopt_func.compiled import Stepper

    n, size = (int(v) for v in shape.split("x"))
    hyper = dict(SETTINGS[setting])
    if rule_name in ("Adam_CM", "Adam_C", "SGD_C", "RMSprop_C") and setting in BUFFER:
        hyper["buffer_dtype"] = BUFFER[setting]
    rule = rules.RULES[rule_name](**hyper)
    gen = torch.Generator().manual_seed(0)
    stepper = Stepper(rule, [torch.randn(size, generator=gen) for _ in range(n)])
    grads = [torch.randn(size, generator=gen) for _ in range(n)]
    first = time_once(lambda: stepper.step(grads))
    times = time_steps(lambda: stepper.step(grads), warmup=5, repeats=steps)
    state = rule._init([torch.empty(3, device="meta")])
    base = getattr(state, "base", state)
    moments = sum(1 for f in base._fields if isinstance(getattr(base, f), tuple) and getattr(base, f))
    slot = 1 if getattr(state, "critical", None) is not None else 0
    width = WIDTH[setting]
    buffer_width = width if slot and setting in BUFFER else 4.0
    numel = n * size
    required = numel * (4 * 2 + 4 + 2 * width * moments + buffer_width * slot)
    bandwidth = stream_bandwidth(256 * 2**20, device="cpu")["max"]
    return {
        "rule": rule_name, "setting": setting, "flat": stepper.flat, "median_s": statistics.median(times),
        "first_s": first, "required_bytes": required, "bandwidth": bandwidth,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="20x1000000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rules", default="AdamW,AdEMAMix,Adam_CM")
    args = ap.parse_args()
    rows = []
    for rule_name in args.rules.split(","):
        for setting in SETTINGS:
            try:
                rows.append(run_cell(cell, rule_name, setting, args.shape, args.steps))
            except CellFailed as e:
                print(e.stderr[-2000:], file=sys.stderr)
                continue
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # each cell as it finishes
    print("| rule | state | layout | step ms | vs fp32 | MB moved | roofline fraction |")
    print("|---|---|---|---|---|---|---|")
    base = {r["rule"]: r["median_s"] for r in rows if r["setting"] == "fp32"}
    for r in rows:
        roof = r["required_bytes"] / r["bandwidth"]
        print(
            f"| {r['rule']} | {r['setting']} | {'flat' if r['flat'] else 'per tensor'} | {r['median_s'] * 1e3:.1f} | "
            f"{r['median_s'] / base[r['rule']]:.2f} | {r['required_bytes'] / 1e6:.0f} | {roof / r['median_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
