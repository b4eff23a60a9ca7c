"""Eager step time of our drop-ins against the published-style loop, each cell in a fresh process.

    python bench/eager_vs_published.py [--sizes 200x10000,20x1000000] [--repeats 3] [--malloc-env] [--device cuda]

Eager CPU steps of multi-megabyte tensors are allocator-bound: glibc returns freed temporaries
to the OS and faults them back in, and how often depends on what the process did before. So
every cell (implementation x rule x size) runs in its own fresh Python process, ours and the
published-style loop alternating, ``--repeats`` times; the table gives the median per cell and
the ratio published / ours (above 1: ours is faster). ``--malloc-env`` runs the same cells with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised, which takes the page faults out
of both sides. Minor page faults per step are reported with each time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cells import run_cell  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}


def step_cell(impl: str, name: str, n: int, size: int, steps: int, device: str = "cpu") -> dict:
    """``impl`` ("ours" or "published") for rule ``name`` over ``n`` tensors of ``size``: the
    median step in ms after 5 warm-up steps, and the minor page faults per timed step. Run it
    through ``run_cell``, so that the allocator starts fresh."""
    import resource

    import torch

    import memopt_func
    from memopt_func.apps.benchmarking import time_steps
    from published_style import PUBLISHED_STYLE

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, device=device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size, device=device)
    opt = (getattr(memopt_func, name) if impl == "ours" else PUBLISHED_STYLE[name])(params, lr=1e-3)
    for _ in range(5):
        opt.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = sorted(time_steps(opt.step, warmup=0, repeats=steps, device=device))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return {"ms": 1e3 * times[len(times) // 2], "faults": faults}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200x10000,20x1000000")
    parser.add_argument("--rules", default="Adam_C,Adam_CM,SGD_C,RMSprop_C")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process (median)")
    parser.add_argument("--malloc-env", action="store_true", help="also run every cell with the malloc thresholds raised")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the published loop's host read per tensor then syncs")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    envs = [("default", {})] + ([("malloc-env", MALLOC_ENV)] if args.malloc_env else [])
    rows = []
    for env_name, env in envs:
        for size in args.sizes.split(","):
            n, numel = (int(x) for x in size.split("x"))
            for name in args.rules.split(","):
                cells = {"ours": [], "published": []}
                for _ in range(args.repeats):
                    for impl in cells:  # alternate, so drift hits both alike
                        cells[impl].append(run_cell(step_cell, impl, name, n, numel, args.steps, args.device, env=env))
                row = {"device": args.device, "allocator": env_name, "size": size, "rule": name}
                for impl, runs in cells.items():
                    row[f"{impl}_ms"] = statistics.median(r["ms"] for r in runs)
                    row[f"{impl}_faults"] = statistics.median(r["faults"] for r in runs)
                row["published_over_ours"] = row["published_ms"] / row["ours_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| allocator | size | rule | ours ms (faults/step) | published-style ms (faults/step) | published / ours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['allocator']} | {r['size']} | {r['rule']} | {r['ours_ms']:.1f} ({r['ours_faults']:.0f}) | "
            f"{r['published_ms']:.1f} ({r['published_faults']:.0f}) | {r['published_over_ours']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
