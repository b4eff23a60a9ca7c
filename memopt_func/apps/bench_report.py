"""``memopt-func bench``: step time of each optimizer against parameter count, with the byte roofline.

Each cell times ``optimizer.step()`` over fixed random gradients (see ``benchmarking``). The
roofline of a cell is its bytes moved per step (params read + written, grads read, each
per-parameter state tensor read + written, a critical buffer as its one written slot) divided by the copy bandwidth measured in the same run, so "x roofline" says how far
a step is from being purely memory-bound on this machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import benchmarking, catalog, common
from ..compiled import compile_optimizer


@dataclass
class BenchConfig:
    optimizers: list[str] = field(default_factory=lambda: list(catalog.DEFAULT))
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    tensors: int = 4
    warmup: int = 3
    repeats: int = 20
    budget_s: float = 1.0
    rounds: int = 2
    copy_mb: int = 256
    compiled: bool = False
    device: str = "cpu"
    seed: int = 0
    out: Path = Path("memopt_out/bench")
    progress: bool = True


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise common.CLIError(f"invalid --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise common.CLIError(f"--device {device}: CUDA is not available in this torch build / machine")
    if dev.type not in ("cpu", "cuda"):
        raise common.CLIError(f"--device {device}: only cpu and cuda are supported")
    return dev


HEADERS = ["optimizer", "mode", "params", "step ms", "roofline ms", "x roofline", "vs Adam", "state B/param"]


def table_rows(cells: list[benchmarking.StepTiming], bandwidth: float) -> list[list[Any]]:
    adam = {c.params: c.median_s for c in cells if c.optimizer == "Adam" and c.mode == "eager"}
    rows = []
    for c in cells:
        roof = c.roofline_s(bandwidth)
        ref = adam.get(c.params)
        rows.append(
            [c.optimizer, c.mode, f"{c.params:,}", 1e3 * c.median_s, 1e3 * roof, f"{c.median_s / roof:.1f}",
             "-" if ref is None else f"{c.median_s / ref:.2f}", f"{c.state_bytes / c.params:.1f}"]
        )
    return rows


def plot(cells: list[benchmarking.StepTiming], bandwidth: float, cfg: BenchConfig) -> Path:
    plt = common.pyplot()
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(14, 5.2), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(c.optimizer for c in cells))
    for i, name in enumerate(names):
        color = cmap(i % 10)
        for mode, style, marker in (("eager", "-", "o"), ("compiled", "--", "^")):
            mine = sorted((c for c in cells if c.optimizer == name and c.mode == mode), key=lambda c: c.params)
            if not mine:
                continue
            xs = [c.params for c in mine]
            label = name if mode == "eager" else f"{name} (compiled)"
            ax.plot(xs, [1e3 * c.median_s for c in mine], style, marker=marker, color=color, label=label)
            ax_ratio.plot(xs, [c.median_s / c.roofline_s(bandwidth) for c in mine], style, marker=marker, color=color, label=label)
            if mode == "eager":
                ax.plot(xs, [1e3 * c.roofline_s(bandwidth) for c in mine], ":", color=color, lw=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("ms per optimizer.step()")
    ax.set_title(f"step time (solid/dashed: measured; dotted: byte roofline at {bandwidth / 1e9:.1f} GB/s copy bandwidth)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax_ratio.set_xscale("log")
    ax_ratio.set_yscale("log")
    ax_ratio.axhline(1.0, color="k", lw=0.8)
    ax_ratio.set_xlabel("parameters")
    ax_ratio.set_ylabel("measured / roofline")
    ax_ratio.set_title("distance from the roofline (1 = memory-bound optimum)", fontsize=10)
    ax_ratio.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"optimizer step time on {cfg.device} ({torch.get_num_threads()} threads), float32, {cfg.tensors} tensors per model")
    path = cfg.out / "step_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(cells: list[benchmarking.StepTiming], bandwidth: float, cfg: BenchConfig) -> list[Path]:
    csv_path = common.write_csv(
        cfg.out / "results.csv",
        ["optimizer", "mode", "params", "median_s", "min_s", "repeats", "state_bytes", "bytes_per_step", "roofline_s"],
        ([c.optimizer, c.mode, c.params, c.median_s, c.min_s, c.repeats, c.state_bytes, c.bytes_per_step, c.roofline_s(bandwidth)] for c in cells),
    )
    json_path = cfg.out / "results.json"
    json_path.write_text(
        json.dumps(
            {
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                "copy_bandwidth_bytes_per_s": bandwidth,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cells": [c.as_dict() for c in cells],
            },
            indent=1,
        )
    )
    return [csv_path, json_path]


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> int:
    """Measure, print the table, write the plot and results; returns the exit status."""
    device = check_device(cfg.device)
    wrap_compiled = compile_optimizer if cfg.compiled else None
    common.prepare_out(cfg.out)
    common.pyplot()
    bandwidth = benchmarking.copy_bandwidth(cfg.copy_mb * 2**20, device=device)
    log(
        f"bench: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, seed {cfg.seed}; copy bandwidth "
        f"{bandwidth / 1e9:.2f} GB/s (tensor.copy_ of {cfg.copy_mb} MiB, read + write counted)"
    )
    jobs: list[tuple[str, int, Callable | None]] = []
    for size in cfg.sizes:
        for name in cfg.optimizers:
            jobs.append((name, size, None))
            if wrap_compiled is not None and catalog.is_memory(name):
                jobs.append((name, size, wrap_compiled))
    progress = common.progress_factory(not cfg.progress)
    # A throwaway cell first: the first steps of a process pay for thread-pool and allocator warm-up.
    benchmarking.time_optimizer("Adam", min(cfg.sizes), n_tensors=cfg.tensors, device=device, warmup=3, repeats=5)
    best: dict[tuple[str, int, str], benchmarking.StepTiming] = {}
    # Whole rounds over all cells, keeping each cell's fastest round, so that a burst of load from
    # elsewhere on the machine spoils one round of a cell rather than the cell.
    rounds = [(r, job) for r in range(cfg.rounds) for job in jobs]
    for _, (name, size, wrap) in progress(rounds, total=len(rounds), desc="bench"):
        cell = benchmarking.time_optimizer(
            name, size, compile_optimizer=wrap, n_tensors=cfg.tensors, device=device,
            warmup=cfg.warmup, repeats=cfg.repeats, budget_s=cfg.budget_s, seed=cfg.seed,
        )
        key = (cell.optimizer, cell.params, cell.mode)
        if key not in best or cell.median_s < best[key].median_s:
            best[key] = cell
    cells = list(best.values())
    cells.sort(key=lambda c: (c.params, cfg.optimizers.index(c.optimizer), c.mode == "compiled"))
    log("")
    log(common.format_table(HEADERS, table_rows(cells, bandwidth), left=2))
    log(
        f"step ms: median of timed optimizer.step() calls (fastest of {cfg.rounds} rounds); roofline ms: (2*params + grads + 2*per-parameter state, buffer = 1 slot) bytes / copy "
        "bandwidth; x roofline: step / roofline; vs Adam: step / torch.optim.Adam (foreach) step at that size"
    )
    if not math.isfinite(bandwidth) or bandwidth <= 0:
        log("! the copy bandwidth could not be measured; the roofline is meaningless")
    paths = [plot(cells, bandwidth, cfg)] + write_results(cells, bandwidth, cfg)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0

