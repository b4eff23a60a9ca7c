"""Where the eager CPU step's time goes against the published loop: SPEC's exact ``buf_sum``
(what it costs, and why a float32 running sum cannot keep it) and the length of its runs.

    python bench/eager_gap.py drift [--steps 1500] [--numel 4096] [--every 0,1000,100,10,2,1]
    python bench/eager_gap.py time [--sizes 200x10000,20x1000000] [--rules Adam_C,SGD_C] [--repeats 2]
    python bench/eager_gap.py runs [--sizes ...] [--rules ...] [--per-run 1,4,25,100] [--repeats 2]

``drift``: Adam_C's functional rule (float32, topC 10, decay 0.99) on a stream whose scale falls
six decades, in three abrupt drops or smoothly. Beside the rule's float64 ``buf_sum``, a float32
running sum ``s += x - old`` (what the published code keeps) follows the same slot writes and is
re-summed from the slots every ``--every`` steps (0: never). The report is the worst element's
error against the bound SPEC's invariant is tested with (``properties/test_prop_field_ready.py``):
``8 * eps(float32) * sum |filled slots|`` at every step. The rule's own sum is reported too.

``time``: eager ``opt.step()`` medians, each cell in a fresh process after 12 warm-up steps (the
topC-10 buffer full): the published-style loop, ours, and ours with ``buf_sum`` kept as a float32
running sum (``critical_buffer.init`` and ``_slot_write._move_sums`` patched in that process
only; it breaks SPEC, and is timed only to size what the exact sum costs). Then two per-tensor
loops over the same tensors: the slot write with an exact float64 sum against a float32 running
sum, and the float64 sum's conversion for the aggregate, which an ideal per-tensor loop like the
published one would still pay.

``runs``: ours with ``cpu_chunk_numel`` set so that each multi-tensor op covers 1, 4, ... tensors,
at the given size and at 16 elements per tensor with the same runs (overhead alone). The
difference is the time spent on the data, and tells whether shorter runs, which keep a run's
tensors in cache between ops as the published per-tensor loop does, make the data cheaper.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from cells import run_cell  # noqa: E402
from memopt_func import rules  # noqa: E402
from memopt_func.apps.benchmarking import time_steps  # noqa: E402

# ---------------------------------------------------------------------------------------- drift


def drift(steps: int, numel: int, every: list[int], jumps: bool, seed: int = 0) -> dict:
    """Worst error / bound over the run, for the rule's buf_sum and a float32 running sum
    re-summed every k steps (k in ``every``; 0 never)."""
    gen = torch.Generator().manual_seed(seed)
    rule = rules.Adam_C(lr=1e-3, topC=10, decay=0.99)
    params = [torch.zeros(numel)]
    state = rule.init(params)
    shadows = {k: torch.zeros(numel) for k in every}
    worst = {k: 0.0 for k in every} | {"rule": 0.0}
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    for step in range(steps):
        frac = step / max(steps - 1, 1)
        level = 2.0 - 6.0 * (round(frac * 3) / 3 if jumps else frac)
        g = (torch.randn(numel, generator=gen, dtype=torch.float64) * 10.0**level).float()
        before = state.critical.buf[0].clone()
        params, state = rule.step(params, [g], state)
        crit = state.critical
        filled = int(crit.count[0])
        slots = crit.buf[0][:filled].double()
        exact, bound = slots.sum(0), 8 * eps * slots.abs().sum(0) + tiny
        changed = (crit.buf[0] != before).any(dim=1).nonzero().flatten().tolist()
        for k, s in shadows.items():
            for j in changed:  # the published code's update, in float32
                s.add_(crit.buf[0][j] - before[j])
            if k and (step + 1) % k == 0:
                s.copy_(slots.sum(0))
            worst[k] = max(worst[k], float(((s.double() - exact).abs() / bound).max()))
        worst["rule"] = max(worst["rule"], float(((crit.buf_sum[0].double() - exact).abs() / bound).max()))
    return worst


# ----------------------------------------------------------------------------------------- time

IMPLS = ("published-style", "ours", "ours, float32 running sum")


def step_cell(impl: str, name: str, n: int, size: int, steps: int, chunk: int = 0) -> float:
    """The median eager step in ms of ``impl`` (one of ``IMPLS``) over ``n`` tensors of ``size``
    after 12 warm-up steps (``chunk``: ours' ``cpu_chunk_numel``). Run it through ``run_cell``:
    the float32 variant patches ``critical_buffer.init`` and ``_slot_write._move_sums`` in the
    process it runs in."""
    import memopt_func
    from memopt_func import _slot_write
    from memopt_func import critical_buffer as cb
    from published_style import PUBLISHED_STYLE

    if impl == "ours, float32 running sum":
        init = cb.init

        def init32(*args, **kwargs):
            state = init(*args, **kwargs)
            return state._replace(buf_sum=tuple(t.float() for t in state.buf_sum))

        def move(totals, stored, rows, replaced):
            torch._foreach_add_(totals, torch._foreach_sub(stored, rows) if replaced else stored)
            torch._foreach_copy_(rows, stored)

        cb.init = init32
        _slot_write._move_sums = move
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size)
    opt = (PUBLISHED_STYLE[name] if impl == "published-style" else getattr(memopt_func, name))(params, lr=1e-3)
    if chunk:
        opt.cpu_chunk_numel = chunk
    for _ in range(12):
        opt.step()
    if impl != "published-style":
        assert opt.state[params[0]]["critical_buf_sum"].dtype == (torch.float32 if "float32" in impl else torch.float64)
    times = sorted(time_steps(opt.step, warmup=0, repeats=steps, device="cpu"))
    return 1e3 * times[len(times) // 2]


def per_tensor_loops(n: int, size: int, repeats: int = 30) -> dict:
    """Median ms of per-tensor loops over n tensors: the slot write with a float64 exact sum and
    with a float32 running sum, and the float64 sum converted for the aggregate."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(size, generator=gen) for _ in range(n)]
    rows = [torch.randn(size, generator=gen) for _ in range(n)]
    s64 = [torch.zeros(size, dtype=torch.float64) for _ in range(n)]
    s32 = [torch.zeros(size) for _ in range(n)]
    c64, o64, a32 = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.float64), torch.empty(size)

    def exact():
        for x, r, s in zip(xs, rows, s64):
            c64.copy_(x)
            o64.copy_(r)
            c64.sub_(o64)
            s.add_(c64)
            r.copy_(x)

    def running():
        for x, r, s in zip(xs, rows, s32):
            s.add_(x - r)
            r.copy_(x)

    def converted():
        for s in s64:
            a32.copy_(s)

    out = {}
    for label, f in (("slot write, float64 exact sum", exact), ("slot write, float32 running sum", running),
                     ("float64 sum to float32 for the aggregate", converted)):
        out[label] = 1e3 * statistics.median(time_steps(f, warmup=3, repeats=repeats))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["drift", "time", "runs"])
    ap.add_argument("--steps", type=int, default=None, help="drift: stream length (1500); time: timed steps per cell (9)")
    ap.add_argument("--numel", type=int, default=4096)
    ap.add_argument("--every", default="0,1000,100,10,2,1")
    ap.add_argument("--sizes", default="200x10000,20x1000000")
    ap.add_argument("--rules", default="Adam_C,SGD_C")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per cell")
    ap.add_argument("--per-run", default="1,4,25,100", help="runs: tensors per multi-tensor op")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    results: dict = {"part": args.part, "torch": torch.__version__}
    if args.part == "drift":
        every = [int(k) for k in args.every.split(",")]
        steps = args.steps or 1500
        print("| stream | " + " | ".join(f"re-summed every {k}" if k else "never re-summed" for k in every) + " | the rule's float64 sum |")
        print("|---|" + "---|" * (len(every) + 1))
        for jumps in (True, False):
            worst = drift(steps, args.numel, every, jumps)
            label = "three drops of two decades" if jumps else "a smooth fall of six decades"
            results[label] = worst
            print(f"| {label} | " + " | ".join(f"{worst[k]:.3g}" for k in [*every, "rule"]) + " |", flush=True)
    elif args.part == "runs":
        steps = args.steps or 9
        print("| size | rule | tensors per run | step ms | at 16 elements per tensor ms | on the data ms |")
        print("|---|---|---|---|---|---|")
        for s in args.sizes.split(","):
            n, size = (int(x) for x in s.split("x"))
            for name in args.rules.split(","):
                for per_run in (int(k) for k in args.per_run.split(",")):
                    # the fastest of the fresh processes: the overhead is subtracted, so noise counts twice
                    full = min(run_cell(step_cell, "ours", name, n, size, steps, size * per_run) for _ in range(args.repeats))
                    bare = min(run_cell(step_cell, "ours", name, n, 16, steps, 16 * per_run) for _ in range(args.repeats))
                    results[f"{s} {name} {per_run}"] = {"ms": full, "overhead_ms": bare}
                    print(f"| {s} | {name} | {per_run} | {full:.1f} | {bare:.1f} | {full - bare:.1f} |", flush=True)
    else:
        steps = args.steps or 9
        print("| size | rule | " + " | ".join(f"{impl} ms" for impl in IMPLS) + " | published / ours | published / ours with float32 sum |")
        print("|---|---|" + "---|" * (len(IMPLS) + 2))
        for s in args.sizes.split(","):
            n, size = (int(x) for x in s.split("x"))
            for name in args.rules.split(","):
                runs: dict[str, list[float]] = {impl: [] for impl in IMPLS}
                for _ in range(args.repeats):  # alternating, each in a fresh process
                    for impl in IMPLS:
                        runs[impl].append(run_cell(step_cell, impl, name, n, size, steps))
                ms = {impl: statistics.median(v) for impl, v in runs.items()}
                results[f"{s} {name}"] = runs
                pub = ms["published-style"]
                print(f"| {s} | {name} | " + " | ".join(f"{ms[i]:.1f}" for i in IMPLS)
                      + f" | {pub / ms['ours']:.2f} | {pub / ms[IMPLS[2]]:.2f} |", flush=True)
            loops = per_tensor_loops(n, size)
            results[f"{s} per-tensor loops"] = loops
            print(f"| {s} | per-tensor loops | " + "; ".join(f"{k}: {v:.2f} ms" for k, v in loops.items()) + " |||", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
