"""Compiled step time at Inductor's default vector width and at another one, or with and without
the C++ compiler's own loops in 512-bit vectors, on a CPU.

    python bench/vector_width.py [--size 20x1000000] [--simdlen 256 | --plain-march] [--stepper]

Each width runs in a fresh process with an empty Inductor cache. In that process every cell is
built, warmed up (12 steps), then timed in five rounds of eight steps, the cells alternating; the
median round is reported, with its ratio to ``torch.compile(torch.optim.AdamW(...).step)`` with a
tensor lr compiled at the default width (the first process). Gradients are set once, not made by
backward. Cells: the compiled drop-ins (AdEMAMix, Adam_CM, Adam_C, SGD_C with momentum 0.9,
RMSprop_C), or with ``--stepper`` the ``compiled.Stepper`` over the bare rules (Adam, AdamW) and
the critical ones with other aggregations, which locate where a step's time goes. The vector
width only changes speed where Inductor compiles right (``bench/RESULTS.md``, "256-bit vectors").
``--plain-march`` compares instead the steps compiled with ``memopt_func.compiled.cpu_codegen``'s
options (the default: ``-march=native -mprefer-vector-width=512`` on an x86 CPU with 512-bit
vectors) against the same steps in a process with ``TORCHINDUCTOR_CPP_MARCH=native`` (plain
``-march=native``, which turns those options off); AdamW runs in both processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cells import run_cell  # noqa: E402

# name -> (the dotted path of a compiled drop-in, or with --stepper of a rule, and its keyword
# arguments); ADAMW is torch.optim.AdamW with a tensor lr and its step compiled
ADAMW = ("torch.optim.AdamW", {})
DROP_INS = {
    "AdEMAMix": ("memopt_func.compiled.AdEMAMix", {"lr": 1e-3}),
    "Adam_CM": ("memopt_func.compiled.Adam_CM", {"lr": 1e-3}),
    "Adam_C": ("memopt_func.compiled.Adam_C", {"lr": 1e-3}),
    "SGD_C": ("memopt_func.compiled.SGD_C", {"lr": 1e-3, "momentum": 0.9}),
    "RMSprop_C": ("memopt_func.compiled.RMSprop_C", {"lr": 1e-3}),
}
STEPPERS = {
    "Stepper(Adam)": ("memopt_func.rules.Adam", {}),
    "Stepper(AdamW)": ("memopt_func.rules.AdamW", {}),
    "Stepper(Adam_C)": ("memopt_func.rules.Adam_C", {}),
    "Stepper(Adam_C, aggr='buffer')": ("memopt_func.rules.Adam_C", {"aggr": "buffer"}),
    "Stepper(Adam_C, kappa=0.5)": ("memopt_func.rules.Adam_C", {"kappa": 0.5}),
    "Stepper(Adam_CM)": ("memopt_func.rules.Adam_CM", {}),
    "Stepper(Adam_CM, aggr='sum')": ("memopt_func.rules.Adam_CM", {"aggr": "sum"}),
}


def width_cell(simdlen: int | None, n: int, size: int, cells: dict[str, list], stepper: bool) -> dict[str, float]:
    """Median ms per step of each cell (name -> ``(path, kwargs)``), every one built and warmed up
    (12 steps) first, then timed in five rounds of eight steps, the cells alternating. Run it
    through ``run_cell``: it sets Inductor's ``cpp.simdlen`` in the process it runs in."""
    import torch
    import torch._inductor.config as inductor

    from cells import resolve
    from memopt_func.apps.benchmarking import time_steps
    from memopt_func.compiled import Stepper

    if simdlen is not None:
        inductor.cpp.simdlen = simdlen

    def build(path, kwargs):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n)]
        grads = [torch.randn(size, generator=gen) for _ in range(n)]
        if path == ADAMW[0]:
            opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3))
            step = torch.compile(opt.step)
        elif stepper:
            st = Stepper(resolve(path)(**kwargs), [p.detach() for p in params])
            step = lambda: st.step(grads, lr=1e-3)  # noqa: E731
        else:
            step = resolve(path)(params, **kwargs).step
        for p, g in zip(params, grads):
            p.grad = g
        for _ in range(12):
            step()
        return step

    steps = {name: build(*make) for name, make in cells.items()}
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(5):
        for name, step in steps.items():
            rounds[name].append(statistics.fmean(time_steps(step, warmup=0, repeats=8)) * 1e3)
    return {name: statistics.median(r) for name, r in rounds.items()}


def run_width(
    simdlen: int | None, n: int, size: int, cells: dict[str, tuple], stepper: bool, env: dict[str, str] | None = None
) -> dict[str, float]:
    """``width_cell`` in a fresh process with an empty Inductor cache at the given ``cpp.simdlen``
    (None: Inductor's default), with ``env`` added to its environment."""
    return run_cell(width_cell, simdlen, n, size, cells, stepper, env=env, empty_inductor_cache=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="20x1000000")
    ap.add_argument("--simdlen", type=int, default=256, help="the width to compare with the default")
    ap.add_argument("--stepper", action="store_true", help="time Steppers over bare rules instead of the drop-ins")
    ap.add_argument(
        "--plain-march", action="store_true", help="compare with TORCHINDUCTOR_CPP_MARCH=native instead of a simdlen"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    n, size = (int(x) for x in args.size.split("x"))
    cells = {"AdamW": ADAMW, **(STEPPERS if args.stepper else DROP_INS)}
    default = run_width(None, n, size, cells, args.stepper)
    if args.plain_march:
        label, key, shown = "TORCHINDUCTOR_CPP_MARCH=native", "plain_march", list(cells)
        other = run_width(None, n, size, cells, args.stepper, env={"TORCHINDUCTOR_CPP_MARCH": "native"})
    else:
        label, key, shown = f"cpp.simdlen={args.simdlen}", f"simdlen_{args.simdlen}", [k for k in cells if k != "AdamW"]
        other = run_width(args.simdlen, n, size, {k: v for k, v in cells.items() if k in shown}, args.stepper)
    base = default["AdamW"]
    print(f"{args.size}, ms (x torch.compile(AdamW.step) in the default process, {base:.2f} ms)")
    print("| process | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for name, row in (("default", default), (label, other)):
        print(f"| {name} | " + " | ".join(f"{row[k]:.2f} ({row[k] / base:.2f})" for k in shown) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": args.size, "default": default, key: other}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
