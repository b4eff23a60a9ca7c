"""Our optimizers beside their peers, side by side in one run, each cell in a fresh process.

    pip install -e '.[bench]'      # HeavyBall and pytorch_optimizer
    python bench/peers.py [--sizes 200x10000,20x1000000] [--steps 10] [--out bench/results-peers.json]

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
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cells import CellFailed, run_json  # noqa: E402

ADEMAMIX = "lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8"
# name -> (module to import, how to build the optimizer from `params`, whether to compile opt.step
# (True, or the keyword arguments of torch.compile as source)[, the arguments of zero_grad])
CODEGEN = 'options=memopt_func.compiled.cpu_codegen.inductor_options(torch.device("cpu"))'

CANDIDATES = {
    "torch.optim.AdamW, torch.compile(opt.step)": ("torch", "torch.optim.AdamW(params, lr=1e-3)", True),
    "torch.optim.AdamW, torch.compile(opt.step, options=cpu_codegen)": (
        "torch", "torch.optim.AdamW(params, lr=1e-3)", CODEGEN),
    "compiled.AdEMAMix": ("memopt_func", f"memopt_func.compiled.AdEMAMix(params, {ADEMAMIX})", False),
    "optim.AdEMAMix, torch.compile(opt.step)": ("memopt_func", f"memopt_func.optim.AdEMAMix(params, {ADEMAMIX})", True),
    "optim.AdEMAMix, eager": ("memopt_func", f"memopt_func.optim.AdEMAMix(params, {ADEMAMIX})", False),
    "HeavyBall AdEMAMix (compiles its step)": ("heavyball", f"heavyball.AdEMAMix(params, {ADEMAMIX})", False),
    "pytorch_optimizer AdEMAMix, eager": ("pytorch_optimizer", f"pytorch_optimizer.AdEMAMix(params, {ADEMAMIX})", False),
    "compiled.Adam_CM": ("memopt_func", "memopt_func.compiled.Adam_CM(params, lr=1e-3)", False),
    "optim.Adam_CM, torch.compile(opt.step)": ("memopt_func", "memopt_func.optim.Adam_CM(params, lr=1e-3)", True),
    "optim.Adam_CM, torch.compile(opt.step), zero_grad(set_to_none=False)": (
        "memopt_func", "memopt_func.optim.Adam_CM(params, lr=1e-3)", True, "set_to_none=False"),
    "optim.Adam_CM, eager": ("memopt_func", "memopt_func.optim.Adam_CM(params, lr=1e-3)", False),
    "compiled.Adam_C": ("memopt_func", "memopt_func.compiled.Adam_C(params, lr=1e-3)", False),
    "compiled.SGD_C": ("memopt_func", "memopt_func.compiled.SGD_C(params, lr=1e-3, momentum=0.9)", False),
    "compiled.RMSprop_C": ("memopt_func", "memopt_func.compiled.RMSprop_C(params, lr=1e-3)", False),
}
BASELINE = "torch.optim.AdamW, torch.compile(opt.step)"

CELL = r"""
import importlib, json, statistics, sys, time, torch
import memopt_func, memopt_func.compiled
module = importlib.import_module({module!r})
globals()[{module!r}.split(".")[0]] = module
n, size, steps = {n}, {size}, {steps}
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n)]
weights = [torch.randn(size, generator=gen) for _ in range(n)]
opt = {make}
step = torch.compile(opt.step{compile_kwargs}) if {compile_step} else opt.step

def backward():
    opt.zero_grad({zero_grad})
    sum((p * w).sum() for p, w in zip(params, weights)).backward()

backward()
t0 = time.perf_counter()
step()
first = time.perf_counter() - t0
for _ in range(3):
    backward()
    step()
times, iters = [], []
for _ in range(steps):
    t0 = time.perf_counter()
    backward()
    t1 = time.perf_counter()
    step()
    t2 = time.perf_counter()
    times.append(t2 - t1)
    iters.append(t2 - t0)
print(json.dumps({{"ms": 1e3 * statistics.median(times), "iter_ms": 1e3 * statistics.median(iters), "first_s": first}}))
"""


def run_cell(name: str, n: int, size: int, steps: int) -> dict:
    module, make, compile_step, *zero_grad = CANDIDATES[name]
    try:
        __import__(module)
    except ImportError:
        return {"missing": f"{module} is not installed (pip install -e '.[bench]')"}
    code = CELL.format(
        module=module, make=make, compile_step=bool(compile_step), zero_grad="".join(zero_grad), n=n, size=size,
        steps=steps, compile_kwargs=f", {compile_step}" if isinstance(compile_step, str) else "",
    )
    try:
        return run_json(code, empty_inductor_cache=True)
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
            table[name][s] = run_cell(name, n, size, args.steps)
            print(json.dumps({"size": s, "name": name, **table[name][s]}), flush=True)
    text = markdown(info, table, sizes)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
