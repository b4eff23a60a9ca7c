"""Step time of every rule against the byte roofline, side by side in one run.

    python bench/roofline.py [--sizes 200x10000,20x1000000] [--out bench/results/results-cpu.json]

For each size (tensors x elements) and rule: our compiled ``Stepper`` (flat buffers, gradients
already in the flat gradient buffer), our eager step (drop-in where one exists, else the pure
rule), and for comparison ``torch.optim.Adam``/``AdamW`` eager (foreach) and ``torch.compile``d
(fused too on CUDA), plus the published-style loop (bench/published_style.py) for the rules it
covers. Bytes per step are what SPEC.md's update must move: parameters read and written,
gradients read, each per-parameter state tensor read and written once (the critical buffer
counts as the one slot a step writes). Divided by the streaming bandwidth measured in the same
run (the best of eager copy_, compiled copy, compiled triad and compiled in-place update),
that is the roofline time; roofline time / measured time is the fraction reported. The same
against eager ``copy_`` alone (the issue's "copy bandwidth") is reported beside it.
Also: compile time of the flat stepper against the number of tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from memopt_func.compiled import Stepper  # noqa: E402
from memopt_func import optim, rules  # noqa: E402
from memopt_func.apps.benchmarking import stream_bandwidth, time_once, time_steps  # noqa: E402
from published_style import PUBLISHED_STYLE  # noqa: E402

CONFIGS = {
    "Adam": {},
    "AdamW": {},
    "SGD": dict(momentum=0.9),
    "RMSprop": {},
    "Adam_C": {},
    "RMSprop_C": {},
    "SGD_C": dict(momentum=0.9),
    "Adam_CM": {},
    "AdEMAMix": {},
}


def state_tensors_per_param(rule) -> int:
    """Per-parameter state tensors a step reads and writes (a critical buffer counts one slot)."""
    state = rule._init([torch.empty(3, device="meta")])
    count = 0

    def walk(node):
        nonlocal count
        for field in node._fields:
            value = getattr(node, field)
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                walk(value)
            elif isinstance(value, tuple) and value:
                count += 1

    walk(state)
    return count


def required_bytes(rule, numel: int, element_size: int) -> int:
    return (3 + 2 * state_tensors_per_param(rule)) * numel * element_size


def _median_time(fn, device, steps: int, warmup: int) -> float:
    return statistics.median(time_steps(fn, warmup=warmup, repeats=steps, device=device))


def _shapes(spec: str) -> list[tuple[int]]:
    n, size = spec.split("x")
    return [(int(size),)] * int(n)


def time_compiled(name: str, shapes, device, steps: int) -> tuple[float, float]:
    torch._dynamo.reset()
    rule = rules.RULES[name](**CONFIGS[name])
    stepper = Stepper(rule, [torch.randn(s, device=device) for s in shapes])
    for g in stepper._grads:
        g.normal_()
    first = time_once(lambda: stepper.step(stepper._grad_views), device)
    return _median_time(lambda: stepper.step(stepper._grad_views), device, steps, warmup=12), first


def _with_grads(shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def time_eager(name: str, shapes, device, steps: int) -> float:
    if hasattr(optim, name):
        opt = getattr(optim, name)(_with_grads(shapes, device), **CONFIGS[name])
        return _median_time(opt.step, device, steps, warmup=12)
    rule = rules.RULES[name](**CONFIGS[name])
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    box = [params, rule.init(params)]

    def step():
        box[0], box[1] = rule.step(box[0], grads, box[1])

    return _median_time(step, device, steps, warmup=3)


def time_torch(name: str, shapes, device, steps: int, mode: str) -> float:
    cls = getattr(torch.optim, name)
    kw = dict(CONFIGS[name])
    if mode == "compiled":
        torch._dynamo.reset()
        opt = cls(_with_grads(shapes, device), lr=torch.tensor(1e-3, device=device), **kw)
        step = torch.compile(opt.step)
        return _median_time(step, device, steps, warmup=3)
    if mode == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    opt = cls(_with_grads(shapes, device), **kw)
    return _median_time(opt.step, device, steps, warmup=3)


def time_published(name: str, shapes, device, steps: int) -> float:
    opt = PUBLISHED_STYLE[name](_with_grads(shapes, device))
    return _median_time(opt.step, device, steps, warmup=12)


def compile_seconds(n_tensors: int, device) -> float:
    torch._dynamo.reset()
    shapes = [(64 + 8 * (i % 16),) for i in range(n_tensors)]
    with torch._inductor.config.patch(fx_graph_cache=False):
        rule = rules.Adam_CM()
        stepper = Stepper(rule, [torch.randn(s, device=device) for s in shapes])
        return time_once(lambda: stepper.step(stepper._grad_views), device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200x10000,20x1000000", help="comma-separated TENSORSxELEMENTS")
    parser.add_argument("--rules", default=",".join(CONFIGS), help="comma-separated rule names")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell (median reported)")
    parser.add_argument("--compile-tensors", default="10,100,1000", help="tensor counts for the compile-time sweep")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "results-cpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    streams = stream_bandwidth(device=device)
    bandwidth = streams["max"]
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bandwidth_GBps": {k: v / 1e9 for k, v in streams.items()},
    }
    print(json.dumps(info))
    rows = []
    for size in args.sizes.split(","):
        shapes = _shapes(size)
        numel = sum(s[0] for s in shapes)
        baselines = {}
        for name in ("Adam", "AdamW"):
            baselines[f"torch.{name} eager"] = time_torch(name, shapes, device, args.steps, "foreach")
            baselines[f"torch.{name} compiled"] = time_torch(name, shapes, device, args.steps, "compiled")
            if device.type == "cuda":
                baselines[f"torch.{name} fused"] = time_torch(name, shapes, device, args.steps, "fused")
        for name in args.rules.split(","):
            rule = rules.RULES[name](**CONFIGS[name])
            nbytes = required_bytes(rule, numel, 4)
            roof = nbytes / bandwidth
            compiled_s, first_s = time_compiled(name, shapes, device, args.steps)
            row = {
                "size": size,
                "rule": name,
                "bytes_per_step": nbytes,
                "roofline_ms": 1e3 * roof,
                "compiled_ms": 1e3 * compiled_s,
                "eager_ms": 1e3 * time_eager(name, shapes, device, args.steps),
                "first_compiled_call_s": first_s,
                "roofline_fraction": roof / compiled_s,
                "roofline_fraction_copy": nbytes / streams["copy_"] / compiled_s,
            }
            base = "AdamW" if name in ("AdamW", "Adam_CM", "AdEMAMix") else "Adam"
            row["torch_eager_ms"] = 1e3 * baselines[f"torch.{base} eager"]
            row["torch_compiled_ms"] = 1e3 * baselines[f"torch.{base} compiled"]
            row["torch_baseline"] = f"torch.optim.{base}"
            if f"torch.{base} fused" in baselines:
                row["torch_fused_ms"] = 1e3 * baselines[f"torch.{base} fused"]
            if name in PUBLISHED_STYLE:
                row["published_style_ms"] = 1e3 * time_published(name, shapes, device, args.steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    compile_times = {}
    for n in [int(x) for x in args.compile_tensors.split(",") if x]:
        compile_times[n] = compile_seconds(n, device)
        print(json.dumps({"compile_tensors": n, "seconds": compile_times[n]}), flush=True)
    with open(args.out, "w") as f:
        json.dump({"info": info, "rows": rows, "compile_seconds": compile_times}, f, indent=1)
    print(markdown(info, rows, compile_times))
    return 0


def markdown(info, rows, compile_times) -> str:
    lines = [
        f"Device: {info['device']}, {info['threads']} threads, torch {info['torch']}. Streaming bandwidth "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in info["bandwidth_GBps"].items())
        + " (bytes read + written; the roofline uses max).",
        "",
        "| size | rule | bytes/step | roofline ms | compiled ms | roofline fraction | fraction vs copy_ | eager ms | torch eager ms | torch compiled ms | published-style ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['rule']} | {r['bytes_per_step'] / 1e6:.0f} MB | {r['roofline_ms']:.1f} | "
            f"{r['compiled_ms']:.1f} | {r['roofline_fraction']:.2f} | {r['roofline_fraction_copy']:.2f} | {r['eager_ms']:.1f} | "
            f"{r['torch_eager_ms']:.1f} ({r['torch_baseline']}) | {r['torch_compiled_ms']:.1f} | "
            f"{r.get('published_style_ms', float('nan')):.1f} |"
        )
    lines += ["", "| tensors | first compiled step (s) |", "|---|---|"]
    lines += [f"| {n} | {s:.1f} |" for n, s in compile_times.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
