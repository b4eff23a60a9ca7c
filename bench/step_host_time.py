"""Per-step time of the compiled drop-ins, and how much of it is host work: for each cell, the
median of ``opt.step()`` with the device synchronised around each step, and the median time the
call itself takes before returning (on CUDA the replayed graph runs after that, asynchronously).

    python bench/step_host_time.py                       # CUDA, 20 x 1M and 200 x 10k
    python bench/step_host_time.py --tree OTHER_CHECKOUT  # the same cells from another tree

Run it once per tree in fresh processes, alternating, to compare two versions side by side
(bench/RESULTS.md, "GPU"). Prints one JSON line per cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="folder holding memopt_func")
    ap.add_argument("--label", default="", help="a name for the tree in the output")
    ap.add_argument("--rules", default="AdEMAMix,Adam_CM")
    ap.add_argument("--sizes", default="20x1000000,200x10000", help="N_TENSORSxNUMEL, comma separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.tree)
    import torch

    from memopt_func import compiled
    from memopt_func.apps.benchmarking import make_params, time_steps

    device = torch.device(args.device)
    for name in args.rules.split(","):
        for size in args.sizes.split(","):
            n, numel = (int(v) for v in size.split("x"))
            opt = getattr(compiled, name)(make_params(n * numel, n, torch.float32, device), lr=1e-3)
            for _ in range(6):  # compile, warm up and (on CUDA) capture
                opt.step()
            host: list[float] = []

            def step() -> None:  # timed synced by time_steps; here until the call returns
                start = time.perf_counter()
                opt.step()
                host.append(time.perf_counter() - start)

            synced = time_steps(step, warmup=0, repeats=args.steps, device=device)
            print(json.dumps({
                "tree": args.label or args.tree, "rule": name, "size": size,
                "ms": 1e3 * statistics.median(synced), "min_ms": 1e3 * min(synced), "host_ms": 1e3 * statistics.median(host),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
