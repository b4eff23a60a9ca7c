"""The GPU check in one command: correctness on the device, then speed against fused and compiled
AdamW, written to a JSON file and a Markdown section.

    python bench/gpu_check.py                 # on a CUDA machine (at most --budget-s of timing)
    python bench/gpu_check.py --dry-run       # anywhere: the same code path at tiny sizes, on CPU

Checks, run first:
  * the GPU tests (``pytest -m gpu``: CUDA-graph replay == eager with lr changed between replays,
    sync debug mode "error" during steps, CUDA state == CPU state), in a subprocess;
  * compiled stepping with CUDA-graph replay equals the eager rule, with the learning rate
    changed between replays (Adam_CM, Adam_C, AdEMAMix, SGD_C);
  * no host synchronisation inside a step: ``torch.cuda.set_sync_debug_mode("error")`` around the
    replayed compiled steps and the eager drop-in's steps (CUDA only);
  * recorded without failing the run: the eager drop-ins' grouped step against their per-tensor
    step on the device, bit for bit (``check_grouped_equals_per_tensor``).
A failed check is recorded and makes the exit status 1; the timing still runs, so that one run
on a lent machine brings back everything it can.
Timing: every cell is the median of ``optimizer.step()`` after warm-up, the device synchronised
around each step; ratios are to ``torch.optim.AdamW(fused=True)`` in the same run; GB/s is the
bytes model of ``apps.benchmarking.bytes_per_step`` over that median, beside the device's
measured copy bandwidth. Cells run in order of importance and none starts after ``--budget-s``
seconds (the rest are listed as skipped); results.json is rewritten after every cell, so a run
stopped from outside keeps what it measured. torch's foreach AdamW stands beside its fused one (the
eager drop-ins' launch count is foreach AdamW's target, bench/launches.py). Three rows step the
compiled drop-ins with narrower state (bf16 rounded stochastically, 8-bit), three the eager ones
at 20 x 1M; one row steps Adam_CM with the critical slot gathered and written back
instead of written through a sink row and re-summed (the two device forms of
``critical_buffer.write``); two rows are PyTorch's recipe, ``torch.compile(opt.step)``, on the
eager drop-ins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memopt_func import compiled, optim, rules  # noqa: E402
from memopt_func import critical_buffer as cb  # noqa: E402
from memopt_func.apps.benchmarking import bytes_per_step, copy_bandwidth, make_params, time_once, time_steps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FULL_SIZES = {"20 x 1M": (20, 1_000_000), "200 x 10k": (200, 10_000)}
DRY_SIZES = {"4 x 1k": (4, 1_000)}
MEMORY = ("AdEMAMix", "Adam_CM", "Adam_C", "SGD_C", "RMSprop_C")
CHECKED = ("Adam_CM", "Adam_C", "AdEMAMix", "SGD_C")
# The dry run leaves most compiled rows out: each first compile takes 10-45 s on the 2-core CPU,
# and the test suite compiles the same steppers elsewhere.
DRY_COMPILED = ("compiled.Adam_CM", "compiled.AdEMAMix", "compiled.Adam_CM, gathered slot")
# Narrower state, where conversions cost little beside memory traffic (on the 2-core CPU they
# made the compiled step slower: bench/RESULTS.md, "Compiled step time with narrower state").
STORAGE = {
    "compiled.AdEMAMix bf16-stochastic": ("AdEMAMix", dict(state_dtype=torch.bfloat16)),
    "compiled.AdEMAMix int8": ("AdEMAMix", dict(state_dtype=torch.int8)),
    "compiled.Adam_CM int8 (state and buffer)": ("Adam_CM", dict(state_dtype=torch.int8, buffer_dtype=torch.int8)),
}


def check_replay(device: torch.device, cuda_graph: bool) -> dict[str, float | str]:
    """Per rule, the worst relative difference between the compiled (graph-replayed) step and the
    eager rule, or what went wrong (a difference of 1e-5 or more, or an error)."""
    out: dict[str, float | str] = {}
    for name in CHECKED:
        try:
            out[name] = _replay_difference(name, device, cuda_graph)
        except Exception as exc:  # recorded; the other rules are still checked
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _replay_difference(name: str, device: torch.device, cuda_graph: bool) -> float | str:
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
        return f"compiled step differs from the eager rule by {worst:.2e}"
    return worst


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


def check_grouped_equals_per_tensor(device: torch.device) -> dict[str, str]:
    """The eager drop-ins' grouped step (one flat group per param group, the accelerator's
    default) against their per-tensor step on the same device, bit for bit, over tensors whose
    offsets in the flat buffer are not 16-byte aligned (a 33-element bias): per optimizer
    "bit-identical", or the worst difference. On a CPU (``--dry-run``) the grouped path is
    switched on by hand, as ``tests/test_grouped_steps.py`` does."""
    from unittest import mock

    from memopt_func import _slot_write

    out = {}
    for name, kw in (("Adam_CM", dict(topC=3)), ("SGD_C", dict(topC=3, momentum=0.9)), ("AdEMAMix", dict(state_dtype=torch.bfloat16))):
        try:
            results = []
            for grouped in (False, True):
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 7)).to(device)
                opt = getattr(optim, name)(model.parameters(), lr=1e-2, **kw)
                gen = torch.Generator().manual_seed(1)
                with contextlib.ExitStack() as stack:
                    stack.enter_context(mock.patch.object(optim, "group_steps", lambda d, g=grouped: g))
                    if device.type == "cpu" and grouped:
                        stack.enter_context(mock.patch.object(_slot_write, "slot_on_host", lambda buf: False))
                    for _ in range(6):
                        x, y = torch.randn(32, 16, generator=gen).to(device), torch.randn(32, 7, generator=gen).to(device)
                        opt.zero_grad()
                        ((model(x) - y) ** 2).mean().backward()
                        opt.step()
                if grouped and "_group_steps" not in opt.__dict__:
                    raise RuntimeError("the grouped path was not taken")
                results.append([p.detach().double().cpu() for p in model.parameters()])
            worst = max((a - b).abs().max().item() for a, b in zip(*results))
            same = all(torch.equal(a, b) for a, b in zip(*results))
            out[name] = "bit-identical" if same else f"differs by up to {worst:.2e}"
        except Exception as exc:  # recorded; the others are still checked
            out[name] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def _cell(make, n_tensors: int, numel: int, device: torch.device, repeats: int) -> dict[str, float]:
    params = make_params(n_tensors * numel, n_tensors, torch.float32, device)
    made: list[torch.optim.Optimizer] = []

    def first_step() -> None:  # built and stepped once: what a first step costs, compiling included
        made.append(make(params))
        made[0].step()

    first = time_once(first_step, device)
    opt = made[0]
    times = time_steps(opt.step, warmup=3, repeats=repeats, device=device, budget_s=5.0)
    median = statistics.median(times)
    cell = {"median_ms": 1e3 * median, "min_ms": 1e3 * min(times), "steps": len(times), "first_step_s": first}
    try:
        cell["gb_per_s"] = bytes_per_step(opt) / median / 1e9
    except Exception:  # a peer whose state has no per-parameter tensors: no bytes model
        pass
    return cell


@contextlib.contextmanager
def _gathered_slot():
    """Build (and first-step) a compiled drop-in whose flat critical buffers carry no sink row, so
    ``critical_buffer.write`` gathers the chosen row and writes it back instead of writing
    through the sink and summing every slot afresh: the other device form, to compare."""
    old = cb.with_sink
    cb.with_sink = lambda state: state
    try:
        yield
    finally:
        cb.with_sink = old


def _sink_rows(node) -> int:
    """How many sink rows the critical buffers in a (stepper's) state carry."""
    if isinstance(node, cb.CriticalBufferState):
        top_c = node.keys.shape[1]
        return sum(b.shape[0] - top_c for b in node.buf if isinstance(b, torch.Tensor))
    if isinstance(node, (tuple, list)):
        return sum(_sink_rows(v) for v in node)
    return 0


def candidates(device: torch.device) -> dict[str, tuple[object, tuple[str, ...] | None]]:
    """name -> (make(params) -> optimizer, the sizes to time it at (None: all)), in the order the
    cells run: the ones the issue's targets name first, experiments and slow compiles last."""

    def compiled_adamw(params):
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3, device=device) if device.type == "cuda" else 1e-3)
        opt.step = torch.compile(opt.step)  # the instance's step, compiled
        return opt

    def gathered(params):
        with _gathered_slot():
            opt = compiled.Adam_CM(params, lr=1e-3)
            opt.step()  # the stepper (and its buffers) are made at the first step
        if any(_sink_rows(s._step_state) for s in opt._steppers.values()):
            raise RuntimeError("the gathered-slot row still wrote through a sink row")
        return opt

    def recipe(name):
        def make(params):
            opt = getattr(optim, name)(params, lr=1e-3)
            opt.step = torch.compile(opt.step)
            return opt

        return make

    big = tuple(FULL_SIZES)[:1] + tuple(DRY_SIZES)
    out: dict[str, tuple[object, tuple[str, ...] | None]] = {
        "torch AdamW fused": (lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True), None),
        "torch AdamW foreach": (lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True), None),
        "torch AdamW compiled": (compiled_adamw, None),
    }
    for name in MEMORY:
        out[f"compiled.{name}"] = (lambda params, name=name: getattr(compiled, name)(params, lr=1e-3), None)
    for name in MEMORY:
        out[f"eager {name}"] = (lambda params, name=name: getattr(optim, name)(params, lr=1e-3), None)
    out["compiled.Adam_CM, gathered slot"] = (gathered, big)
    for label, (name, storage) in STORAGE.items():
        out[label] = (lambda params, name=name, storage=storage: getattr(compiled, name)(params, lr=1e-3, **storage), big)
    for label, (name, storage) in STORAGE.items():  # eager narrow state, launched per tensor today (bench/launches.py)
        out[label.replace("compiled.", "eager ", 1)] = (
            lambda params, name=name, storage=storage: getattr(optim, name)(params, lr=1e-3, **storage), big
        )
    for name in ("Adam_CM", "AdEMAMix"):
        out[f"optim.{name}, torch.compile(opt.step)"] = (recipe(name), big)
    return out


def gpu_tests(device: torch.device, log: Path) -> dict[str, object]:
    """``pytest -m gpu`` in a subprocess: its summary line and exit status (on CPU they skip)."""
    # the marker chooses the tests (collecting the whole folder costs about a second)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        log.write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {"ok": False, "summary": "timed out after 300 s"}
    log.write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    # exit 5: nothing collected to run, which is every test skipped or deselected
    ok = proc.returncode == 0 or (device.type != "cuda" and proc.returncode == 5)
    return {"ok": ok, "returncode": proc.returncode, "summary": lines[-1] if lines else ""}


def _fmt(cell: dict, base: dict | None) -> str:
    if "median_ms" not in cell:
        return cell.get("error", cell.get("skipped", "-"))[:60]
    ratio = f" ({cell['median_ms'] / base['median_ms']:.2f})" if base and "median_ms" in base else ""
    gbs = f", {cell['gb_per_s']:.0f} GB/s" if "gb_per_s" in cell else ""
    return f"{cell['median_ms']:.3f}{ratio}{gbs}"


def markdown(info: dict, checks: dict, table: dict) -> str:
    sizes = list(info["sizes"])
    replay = checks.get("replay", {})
    lines = [
        f"## GPU check: {info['device']}",
        "",
        f"torch {info['torch']}, Python {info['python']}, {info['when']}; `python bench/gpu_check.py`"
        + (" --dry-run (CPU, tiny sizes: a code-path check, not a measurement)" if info["dry_run"] else ""),
        f"Device copy bandwidth (read + write): {info.get('copy_gb_per_s', 0):.0f} GB/s.",
        "",
        f"GPU tests (`pytest -m gpu`): {checks.get('gpu_tests', {}).get('summary', 'not run')}.",
        "Compiled (CUDA-graph) step vs eager rule, worst relative difference over 10 steps with lr "
        "changing between replays: "
        + (", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} FAILED ({v})" for k, v in replay.items()) or "not run")
        + ".",
        f"No host sync inside the eager drop-in's steps (sync debug mode 'error'): {checks.get('no_sync', 'not run')}.",
        f"Eager grouped step vs per-tensor step, 6 steps, bit for bit: {checks.get('grouped_vs_per_tensor', 'not run')}.",
        "",
        "| optimizer | " + " | ".join(f"{s}: ms (x fused AdamW), GB/s" for s in sizes) + " | first step s |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    base = table.get("torch AdamW fused", {})
    for name, cells in table.items():
        row = [_fmt(cells[s], base.get(s)) if s in cells else "-" for s in sizes]
        firsts = [c["first_step_s"] for c in cells.values() if "first_step_s" in c]
        first = f"{max(firsts):.1f}" if firsts else "-"
        lines.append(f"| {name} | " + " | ".join(row) + f" | {first} |")
    return "\n".join(lines) + "\n"


def _save(out: Path, info: dict, checks: dict, table: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"info": info, "checks": checks, "table": table}, indent=2))
    (out / "RESULTS-gpu.md").write_text(markdown(info, checks, table))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same code path, no measurement")
    ap.add_argument("--out", default="bench/results/gpu", help="folder for results.json and RESULTS-gpu.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no timing cell after this many seconds")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the code-path check", file=sys.stderr)
        return 2
    began = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY_SIZES if args.dry_run else FULL_SIZES
    out = Path(args.out)
    info = {
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
        "sizes": list(sizes), "budget_s": args.budget_s,
        "copy_gb_per_s": copy_bandwidth(2**30 if device.type == "cuda" else 2**20, device=device) / 1e9,
    }
    print(f"device: {info['device']}, torch {info['torch']}, copy {info['copy_gb_per_s']:.0f} GB/s", flush=True)
    checks: dict[str, object] = {}
    table: dict[str, dict] = {}
    failed = []
    out.mkdir(parents=True, exist_ok=True)
    checks["gpu_tests"] = gpu_tests(device, out / "gpu-tests.log")
    if not checks["gpu_tests"]["ok"]:
        failed.append("gpu tests")
    print("gpu tests:", checks["gpu_tests"], flush=True)
    checks["replay"] = check_replay(device, cuda_graph=device.type == "cuda")
    failed += [f"replay {k}" for k, v in checks["replay"].items() if isinstance(v, str)]
    try:
        checks["no_sync"] = check_eager_no_sync(device)
    except Exception as exc:
        checks["no_sync"] = f"FAILED: {type(exc).__name__}: {exc}"[:300]
        failed.append("no sync")
    # recorded, not failed on: a last-bit difference here says where the docs' "bit for bit" holds
    checks["grouped_vs_per_tensor"] = check_grouped_equals_per_tensor(device)
    print("checks:", checks, flush=True)
    _save(out, info, checks, table)
    for name, (make, only) in candidates(device).items():
        if args.dry_run and name.startswith("compiled.") and name not in DRY_COMPILED:
            continue  # compiling costs seconds per cell on a CPU; these cover the path
        if args.dry_run and name.startswith("optim."):
            continue  # the recipe's compile of the eager drop-ins is tested in tests/test_compile_recipe.py
        table[name] = {}
        for label, (n, numel) in sizes.items():
            if only is not None and label not in only:
                continue
            if time.perf_counter() - began > args.budget_s:
                table[name][label] = {"skipped": f"not started: past the {args.budget_s:.0f} s budget"}
                continue
            torch._dynamo.reset()  # each compiled cell compiles afresh, as a user's first run does
            try:
                table[name][label] = _cell(make, n, numel, device, repeats=5 if args.dry_run else 50)
            except Exception as exc:  # recorded in the table; the other cells still run
                table[name][label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"{name:40s} {label:10s} {_fmt(table[name][label], None)}", flush=True)
            _save(out, info, checks, table)
    info["elapsed_s"] = time.perf_counter() - began
    _save(out, info, checks, table)
    print(markdown(info, checks, table))
    if failed:
        print("FAILED checks:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
