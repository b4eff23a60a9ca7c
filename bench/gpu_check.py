"""The GPU check in one command: correctness on the device, then speed against fused and compiled
AdamW, written to a JSON file and a Markdown section.

    python bench/gpu_check.py                 # on a CUDA machine (about 5 minutes)
    python bench/gpu_check.py --dry-run       # anywhere: the same code path at tiny sizes, on CPU

Checks (each must pass before anything is timed):
  * compiled stepping with CUDA-graph replay equals the eager rule, with the learning rate
    changed between replays (Adam_CM, Adam_C, AdEMAMix, SGD_C);
  * no host synchronisation inside a step: ``torch.cuda.set_sync_debug_mode("error")`` around the
    replayed compiled steps and the eager drop-in's steps (CUDA only).
Timing: every cell is the median of ``optimizer.step()`` after warm-up, the device synchronised
around each step; ratios are to ``torch.optim.AdamW(fused=True)`` in the same run. Three rows
step with narrower state (bf16 rounded stochastically, 8-bit), where fewer bytes should mean a
faster step on a GPU (on the 2-core CPU they did not; see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memopt_func import compiled, optim, rules  # noqa: E402
from memopt_func.apps.benchmarking import make_params, time_steps  # noqa: E402

FULL_SIZES = {"200 x 10k": (200, 10_000), "20 x 1M": (20, 1_000_000)}
DRY_SIZES = {"4 x 1k": (4, 1_000)}
MEMORY = ("AdEMAMix", "Adam_CM", "Adam_C", "SGD_C", "RMSprop_C")
CHECKED = ("Adam_CM", "Adam_C", "AdEMAMix", "SGD_C")
# The dry run leaves the storage rows out: the first compile of a stochastically rounded step
# takes about 45 s on the 2-core CPU, and tests/test_storage.py compiles the same steppers.
DRY_COMPILED = ("compiled.Adam_CM", "compiled.AdEMAMix")
# Narrower state, where conversions cost little beside memory traffic (on the 2-core CPU they
# made the compiled step slower: bench/RESULTS.md, "Compiled step time with narrower state").
STORAGE = {
    "compiled.AdEMAMix bf16-stochastic": ("AdEMAMix", dict(state_dtype=torch.bfloat16)),
    "compiled.AdEMAMix int8": ("AdEMAMix", dict(state_dtype=torch.int8)),
    "compiled.Adam_CM int8 (state and buffer)": ("Adam_CM", dict(state_dtype=torch.int8, buffer_dtype=torch.int8)),
}


def check_replay(device: torch.device, cuda_graph: bool) -> dict[str, float]:
    """Worst relative difference between the compiled (graph-replayed) step and the eager rule."""
    out = {}
    for name in CHECKED:
        rule = rules.RULES[name](lr=1e-2, **({"topC": 3, "decay": 0.95} if name != "AdEMAMix" else {}))
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(s, generator=gen).to(device) for s in ((64, 32), (32,), (32, 8))]
        stepper = compiled.Stepper(rule, [p.clone() for p in start], cuda_graph=cuda_graph)
        ref, state = [p.clone() for p in start], rule.init(start)
        worst = 0.0
        for k in range(10):
            lr = 1e-2 * (1 + k % 3)
            grads = [(torch.randn(p.shape, generator=gen) * 10.0 ** (k % 4 - 2)).to(device) for p in start]
            stepper.set_hyper(lr=lr)
            if cuda_graph and k >= 4:  # replayed steps: nothing may read a device value on the host
                torch.cuda.set_sync_debug_mode("error")
            try:
                stepper.step(grads)
            finally:
                if cuda_graph:
                    torch.cuda.set_sync_debug_mode("default")
            ref, state = rule.step(ref, grads, state, lr=lr)
            for a, b in zip(stepper.params, ref):
                worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
        if not worst < 1e-5:
            raise AssertionError(f"{name}: compiled step differs from the eager rule by {worst:.2e}")
        out[name] = worst
    return out


def check_eager_no_sync(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
    opt = optim.Adam_CM(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 16, device=device), torch.randn(64, 1, device=device)
    for k in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if k:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return True


def _cell(make, n_tensors: int, numel: int, device: torch.device, repeats: int) -> dict[str, float]:
    params = make_params(n_tensors * numel, n_tensors, torch.float32, device)
    start = time.perf_counter()
    opt = make(params)
    opt.step()
    first = time.perf_counter() - start
    times = time_steps(opt.step, warmup=3, repeats=repeats, device=device, budget_s=5.0)
    return {"median_ms": 1e3 * statistics.median(times), "first_step_s": first}


def candidates(device: torch.device) -> dict[str, object]:
    def compiled_adamw(params):
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3, device=device) if device.type == "cuda" else 1e-3)
        step = torch.compile(opt.step)
        opt.step = step  # the instance's step, compiled
        return opt

    out = {
        "torch AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
        "torch AdamW compiled": compiled_adamw,
    }
    for name in MEMORY:
        out[f"compiled.{name}"] = lambda params, name=name: getattr(compiled, name)(params, lr=1e-3)
        out[f"eager {name}"] = lambda params, name=name: getattr(optim, name)(params, lr=1e-3)
    for label, (name, storage) in STORAGE.items():
        out[label] = lambda params, name=name, storage=storage: getattr(compiled, name)(params, lr=1e-3, **storage)
    return out


def markdown(info: dict, checks: dict, table: dict) -> str:
    sizes = list(next(iter(table.values())).keys())
    lines = [
        f"## GPU check: {info['device']}",
        "",
        f"torch {info['torch']}, Python {info['python']}, {info['when']}; `python bench/gpu_check.py`"
        + (" --dry-run (CPU, tiny sizes: a code-path check, not a measurement)" if info["dry_run"] else ""),
        "",
        "Compiled (CUDA-graph) step vs eager rule, worst relative difference over 10 steps with lr "
        "changing between replays: " + ", ".join(f"{k} {v:.1e}" for k, v in checks["replay"].items()) + ".",
        f"No host sync inside steps (sync debug mode 'error'): {'checked' if checks['no_sync'] else 'not checked (no CUDA)'}.",
        "",
        "| optimizer | " + " | ".join(f"{s}: ms (x fused AdamW)" for s in sizes) + " | first step s |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    base = table["torch AdamW fused"]
    for name, cells in table.items():
        row = [f"{cells[s]['median_ms']:.3f} ({cells[s]['median_ms'] / base[s]['median_ms']:.2f})" for s in sizes]
        first = max(cells[s]["first_step_s"] for s in sizes)
        lines.append(f"| {name} | " + " | ".join(row) + f" | {first:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code path, no measurement")
    ap.add_argument("--out", default="bench/gpu_results", help="folder for results.json and RESULTS-gpu.md")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the code-path check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    info = {
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
    }
    print(f"device: {info['device']}, torch {info['torch']}", flush=True)
    checks = {"replay": check_replay(device, cuda_graph=device.type == "cuda"), "no_sync": check_eager_no_sync(device)}
    print("checks passed:", checks, flush=True)
    sizes = DRY_SIZES if args.dry_run else FULL_SIZES
    table: dict[str, dict] = {}
    for name, make in candidates(device).items():
        if args.dry_run and name.startswith("compiled.") and name not in DRY_COMPILED:
            continue  # compiling costs seconds per cell on a CPU; two of the five cover the path
        table[name] = {}
        for label, (n, numel) in sizes.items():
            torch._dynamo.reset()  # each compiled cell compiles afresh, as a user's first run does
            table[name][label] = _cell(make, n, numel, device, repeats=5 if args.dry_run else 50)
            print(f"{name:24s} {label:10s} {table[name][label]['median_ms']:9.3f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"info": info, "checks": checks, "table": table}, indent=2))
    text = markdown(info, checks, table)
    (out / "RESULTS-gpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
