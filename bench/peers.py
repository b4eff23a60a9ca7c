"""Our optimizers beside their peers, side by side in one run, each cell in a fresh process.

    pip install -e '.[bench]'      # HeavyBall and pytorch_optimizer
    python bench/peers.py [--sizes 200x10000,20x1000000] [--steps 10] [--out bench/results/results-peers.json]

Every cell builds ``N`` parameters of ``M`` elements, then steps as a training loop does: before
each step ``zero_grad()`` and a backward pass (of ``sum((p * w).sum())`` with fixed random ``w``)
leave the gradients where backward leaves them. The columns: the median ``optimizer.step()``
after 3 warm-up steps and the median whole iteration (``zero_grad``, backward and step; where the
gradients go, and so what the step and backward each pay for them, depends on ``zero_grad``),
each with its ratio to ``torch.compile(torch.optim.AdamW(...).step)`` (PyTorch's recipe) at the
same size, and the first step's time, which includes compiling: each cell gets an empty Inductor
cache, as a user's first run does. The row with ``options=cpu_codegen`` compiles AdamW's step
with ``torch.compile(opt.step, options=memopt_func.compiled.cpu_codegen.inductor_options(device))``,
the Inductor options that our compiled steppers use (on an x86 CPU with 512-bit vectors, the C++
compiler's own loops in 512-bit vectors; nothing elsewhere), to show what they do for AdamW.
AdEMAMix everywhere runs lr 1e-3, betas (0.9, 0.999, 0.9999), alpha 5, eps 1e-8, no weight decay.
Rows whose package is not installed are reported as missing, not dropped silently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cells import CellFailed, run_cell  # noqa: E402

ADEMAMIX = {"lr": 1e-3, "betas": [0.9, 0.999, 0.9999], "alpha": 5.0, "eps": 1e-8}
LR = {"lr": 1e-3}
# name -> (the optimizer class's dotted path, its keyword arguments (a list stands for a tuple),
# whether to compile opt.step: False, True, CODEGEN or torch.compile's keyword arguments
# [, the keyword arguments of zero_grad]); JSON, as it goes to the cell's process
CODEGEN = "cpu_codegen"  # options=memopt_func.compiled.cpu_codegen.inductor_options(torch.device("cpu"))

CANDIDATES = {
    "torch.optim.AdamW, torch.compile(opt.step)": ("torch.optim.AdamW", LR, True),
    "torch.optim.AdamW, torch.compile(opt.step, options=cpu_codegen)": ("torch.optim.AdamW", LR, CODEGEN),
    "compiled.AdEMAMix": ("memopt_func.compiled.AdEMAMix", ADEMAMIX, False),
    "optim.AdEMAMix, torch.compile(opt.step)": ("memopt_func.optim.AdEMAMix", ADEMAMIX, True),
    "optim.AdEMAMix, eager": ("memopt_func.optim.AdEMAMix", ADEMAMIX, False),
    "HeavyBall AdEMAMix (compiles its step)": ("heavyball.AdEMAMix", ADEMAMIX, False),
    "pytorch_optimizer AdEMAMix, eager": ("pytorch_optimizer.AdEMAMix", ADEMAMIX, False),
    "compiled.Adam_CM": ("memopt_func.compiled.Adam_CM", LR, False),
    "optim.Adam_CM, torch.compile(opt.step)": ("memopt_func.optim.Adam_CM", LR, True),
    "optim.Adam_CM, torch.compile(opt.step), zero_grad(set_to_none=False)": (
        "memopt_func.optim.Adam_CM", LR, True, {"set_to_none": False}),
    "optim.Adam_CM, eager": ("memopt_func.optim.Adam_CM", LR, False),
    "compiled.Adam_C": ("memopt_func.compiled.Adam_C", LR, False),
    "compiled.SGD_C": ("memopt_func.compiled.SGD_C", {"lr": 1e-3, "momentum": 0.9}, False),
    "compiled.RMSprop_C": ("memopt_func.compiled.RMSprop_C", LR, False),
}
BASELINE = "torch.optim.AdamW, torch.compile(opt.step)"


def peer_cell(candidate: list, n: int, size: int, steps: int) -> dict:
    """One ``CANDIDATES`` entry over ``n`` parameters of ``size`` elements, stepped as a training
    loop does: the median step and whole iteration in ms after 3 warm-up steps, and the first
    step in seconds. Run it through ``run_cell``, with an empty Inductor cache."""
    import torch

    import memopt_func.compiled  # noqa: F401  (every cell, so that none pays this import in its first step)
    from cells import resolve
    from memopt_func.apps.benchmarking import time_once, time_steps

    path, kwargs, compile_step, *zero_grad = candidate
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n)]
    weights = [torch.randn(size, generator=gen) for _ in range(n)]
    opt = resolve(path)(params, **kwargs)
    if compile_step == CODEGEN:
        from memopt_func.compiled.cpu_codegen import inductor_options

        compile_step = {"options": inductor_options(torch.device("cpu"))}
    step = torch.compile(opt.step, **(compile_step if isinstance(compile_step, dict) else {})) if compile_step else opt.step

    def backward():
        opt.zero_grad(**(zero_grad[0] if zero_grad else {}))
        sum((p * w).sum() for p, w in zip(params, weights)).backward()

    backward()
    first = time_once(step)
    for _ in range(3):
        backward()
        step()
    times = []

    def iteration():  # timed whole; its step timed inside it
        backward()
        times.append(time_once(step))

    iters = time_steps(iteration, warmup=0, repeats=steps)
    return {"ms": 1e3 * statistics.median(times), "iter_ms": 1e3 * statistics.median(iters), "first_s": first}


def run_peer(name: str, n: int, size: int, steps: int) -> dict:
    """``peer_cell`` of candidate ``name`` in a fresh process, or what kept it from running."""
    candidate = CANDIDATES[name]
    module = candidate[0].split(".")[0]
    try:
        importlib.import_module(module)
    except ImportError:
        return {"missing": f"{module} is not installed (pip install -e '.[bench]')"}
    try:
        return run_cell(peer_cell, candidate, n, size, steps, empty_inductor_cache=True)
    except CellFailed as e:  # reported in the table, not raised: one broken peer keeps the others
        return {"error": e.last_line()}


def markdown(info: dict, table: dict, sizes: list[str]) -> str:
    lines = [
        f"torch {info['torch']}, Python {info['python']}, {info['cpu']}, {info['threads']} threads; "
        f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
        "",
        "| optimizer | "
        + " | ".join(f"{s}: step ms (x recipe AdamW) | iteration ms (x) | first step s" for s in sizes)
        + " |",
        "|---|" + "---|---|---|" * len(sizes),
    ]
    for name, cells in table.items():
        row = []
        for s in sizes:
            c, base = cells[s], table[BASELINE][s]
            if "ms" not in c:
                row.append(f"{c.get('missing') or c.get('error')} | - | -")
            else:
                row.append(f"{_cell(c, base, 'ms')} | {_cell(c, base, 'iter_ms')} | {c['first_s']:.1f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _cell(c: dict, base: dict, key: str) -> str:
    """A time in ms with its ratio to the baseline's (``-`` where a result lacks it)."""
    if key not in c:
        return "-"
    ratio = f" ({c[key] / base[key]:.2f})" if key in base else ""
    return f"{c[key]:.2f}{ratio}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200x10000,20x1000000")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default=None, help="candidate names separated by ';' (default: all)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    import torch
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("heavyball", "pytorch-optimizer"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    info = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "versions": versions, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    names = [n.strip() for n in args.only.split(";")] if args.only else list(CANDIDATES)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    sizes = args.sizes.split(",")
    table: dict[str, dict] = {name: {} for name in names}
    for s in sizes:
        n, size = (int(x) for x in s.split("x"))
        for name in names:
            table[name][s] = run_peer(name, n, size, args.steps)
            print(json.dumps({"size": s, "name": name, **table[name][s]}), flush=True)
    text = markdown(info, table, sizes)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
