"""Model ensembling: ``vmap(rule.step)`` over E stacked members against a Python loop that steps
each member with its own rule state, side by side in one process (ratio = loop / vmap).

    python bench/ensemble.py [--members 8] [--width 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memopt_func import rules  # noqa: E402
from memopt_func.apps.benchmarking import time_steps  # noqa: E402


def _time(fn, steps: int) -> float:
    """Seconds per call: after one warm-up call, the best of three rounds of ``steps`` calls."""
    times = time_steps(fn, warmup=1, repeats=3 * steps)
    return min(sum(times[k * steps:(k + 1) * steps]) / steps for k in range(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rules", default="AdamW,Adam_CM,AdEMAMix")
    args = ap.parse_args()
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(args.width, args.width), nn.Tanh(), nn.Linear(args.width, 10)) for _ in range(args.members)]
    stacked, _ = stack_module_state(members)
    stacked = {k: v.detach() for k, v in stacked.items()}
    grads = {k: torch.randn_like(v) for k, v in stacked.items()}
    print(f"{args.members} members of a {args.width}-wide MLP ({sum(v[0].numel() for v in stacked.values())} params each), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'rule':10s} {'loop ms':>9s} {'vmap ms':>9s} {'loop/vmap':>10s}")
    for name in args.rules.split(","):
        rule = rules.RULES[name](lr=1e-3)
        ens_state = vmap(rule.init)(stacked)
        step = vmap(rule.step)
        box = {"p": stacked, "s": ens_state}

        def ensemble():
            box["p"], box["s"] = step(box["p"], grads, box["s"])

        singles = [{k: v[e].clone() for k, v in stacked.items()} for e in range(args.members)]
        single_grads = [{k: v[e] for k, v in grads.items()} for e in range(args.members)]
        states = [rule.init(p) for p in singles]

        def loop():
            for e in range(args.members):
                singles[e], states[e] = rule.step(singles[e], single_grads[e], states[e], donate=True)

        t_loop, t_vmap = _time(loop, args.steps), _time(ensemble, args.steps)
        print(f"{name:10s} {t_loop * 1e3:9.2f} {t_vmap * 1e3:9.2f} {t_loop / t_vmap:10.2f}")


if __name__ == "__main__":
    main()
