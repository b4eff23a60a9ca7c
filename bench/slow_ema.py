"""AdEMAMix's slow EMA stored in bfloat16: stochastic rounding against rounding to nearest.

Constant gradient 1, float32 parameters, ``state_dtype=torch.bfloat16``, ``beta3 = 0.9999``,
20k steps (no beta3 warmup). In exact arithmetic the slow EMA is ``1 - beta3**t``. Each step adds
``(1 - beta3) * (1 - m)``, at most 1e-4: below half a bfloat16 step once ``m`` reaches 2**-5, so
rounding to nearest stalls there, while stochastic rounding keeps the expectation.

Run: ``python bench/slow_ema.py [--steps 20000]``; prints the EMA every 2000 steps and the final
ratio to the exact value for each rounding.
"""

from __future__ import annotations

import argparse

import torch

from memopt_func import rules


def run(rounding: str, steps: int, beta3: float, every: int, n: int = 1024) -> list[tuple[int, float]]:
    rule = rules.AdEMAMix(lr=0.0, betas=(0.9, 0.999, beta3), state_dtype=torch.bfloat16, rounding=rounding)
    params, grads = [torch.zeros(n)], [torch.ones(n)]
    state = rule.init(params)
    out = []
    for t in range(1, steps + 1):
        params, state = rule.step(params, grads, state, donate=True)
        if t % every == 0:
            out.append((t, state.exp_avg_slow[0].double().mean().item()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--beta3", type=float, default=0.9999)
    args = ap.parse_args()
    every = max(1, args.steps // 10)
    runs = {r: run(r, args.steps, args.beta3, every) for r in ("stochastic", "nearest")}
    print(f"{'step':>6} {'exact':>8} {'stochastic':>11} {'nearest':>8}")
    for (t, s), (_, nr) in zip(runs["stochastic"], runs["nearest"]):
        print(f"{t:6d} {1 - args.beta3**t:8.4f} {s:11.4f} {nr:8.4f}")
    exact = 1 - args.beta3**args.steps
    for r, values in runs.items():
        print(f"{r}: final / exact = {values[-1][1] / exact:.4f}")


if __name__ == "__main__":
    main()
