"""``memopt-func demo``: train one small model with each optimizer and compare them.

Data: the two-spirals generator of ``functional_example`` (ships with the package, no
downloads), a training set and an independently drawn validation set. Model: a 2-64-64-2 tanh
MLP, the same initial weights for every optimizer. Mini-batch training with cross-entropy; the
full training and validation sets are evaluated every ``eval_every`` steps.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import catalog, common
from .benchmarking import state_bytes
from ..compiled import compile_optimizer
from .functional_example import small_mlp, two_spirals

# Hyperparameters that train this demo well in its default number of steps (lr picked by a sweep
# on this data; everything else at the optimizer's own default). SGD_C runs without momentum: its
# "sum" aggregate (gradient + mean of up to 10 remembered gradients) already acts like momentum,
# and adding momentum 0.9 on top stalls it on the spirals' plateau.
DEMO_HYPER: dict[str, dict[str, Any]] = {
    "Adam": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=1e-2),
    "SGD": dict(lr=0.1, momentum=0.9),
    "RMSprop": dict(lr=2e-3),
    "Adam_CM": dict(lr=5e-3),
    "Adam_C": dict(lr=1e-2),
    "SGD_C": dict(lr=0.3),
    "RMSprop_C": dict(lr=2e-3),
    "AdEMAMix": dict(lr=1e-2),
}


def demo_hyper(name: str) -> dict[str, Any]:
    """The demo's settings for ``name`` (``DEMO_HYPER``; a registered optimizer it does not list
    runs at lr 1e-3 and its own defaults)."""
    return dict(DEMO_HYPER.get(name, {"lr": 1e-3}))


@dataclass
class DemoConfig:
    optimizers: list[str] = field(default_factory=lambda: list(catalog.DEFAULT))
    steps: int = 1500
    batch_size: int = 128
    n_train: int = 1024
    n_val: int = 512
    hidden: int = 64
    noise: float = 0.05
    eval_every: int = 25
    seed: int = 0
    lr: dict[str, float] = field(default_factory=dict)
    out: Path = Path("memopt_out/demo")
    compiled: bool = False
    progress: bool = True
    storage: str = "fp32"  # optimizer state storage (``catalog.STORAGE``)
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)  # --set overrides, by optimizer


@dataclass
class RunResult:
    optimizer: str
    hyper: dict[str, Any]
    mode: str
    steps: list[int]
    train_loss: list[float]
    val_loss: list[float]
    train_acc: list[float]
    val_acc: list[float]
    batch_loss: list[float]
    step_ms: float  # median optimizer.step()
    iter_ms: float  # median of a whole training iteration (forward, backward, step)
    seconds: float
    state_bytes_per_param: float
    admitted: float | None  # fraction of critical-buffer offers admitted (memory optimizers only)
    error: str | None = None

    def final(self, key: str) -> float:
        values = getattr(self, key)
        return values[-1] if values else math.nan


def make_data(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): two spirals, the validation set drawn with its own seed."""
    x_tr, y_tr = two_spirals(n=cfg.n_train, noise=cfg.noise, seed=cfg.seed)
    x_va, y_va = two_spirals(n=cfg.n_val, noise=cfg.noise, seed=cfg.seed + 1_000_003)
    return x_tr, y_tr, x_va, y_va


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_one(
    name: str,
    cfg: DemoConfig,
    data: tuple[torch.Tensor, ...],
    compile_optimizer: Callable | None = None,
    progress: Callable = common.quiet_progress,
) -> RunResult:
    """Train a fresh copy of the demo model with optimizer ``name``."""
    x_tr, y_tr, x_va, y_va = data
    hyper = common.with_overrides(name, demo_hyper(name), cfg.hyper.get(name, {}))
    hyper["lr"] = common.resolve_lr(name, hyper["lr"], cfg.lr)
    model = small_mlp(seed=cfg.seed, hidden=cfg.hidden)
    opt = catalog.make_optimizer(name, model.parameters(), storage=cfg.storage, **hyper)
    wrap = compile_optimizer is not None and catalog.is_memory(name)
    stepper = compile_optimizer(opt) if wrap else opt
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())

    result = RunResult(name, hyper, "compiled" if wrap else "eager", [], [], [], [], [], [], math.nan, math.nan, 0.0, math.nan, None)

    def record(step: int) -> None:
        tl, ta = evaluate(model, x_tr, y_tr)
        vl, va = evaluate(model, x_va, y_va)
        result.steps.append(step)
        result.train_loss.append(tl)
        result.train_acc.append(ta)
        result.val_loss.append(vl)
        result.val_acc.append(va)

    step_times, iter_times = [], []
    start = time.perf_counter()
    record(0)
    perm = torch.randperm(len(x_tr), generator=gen)
    cursor = 0
    bar = progress(range(1, cfg.steps + 1), total=cfg.steps, desc=f"{name:<10}")
    for step in bar:
        if cursor + cfg.batch_size > len(perm):
            perm, cursor = torch.randperm(len(x_tr), generator=gen), 0
        idx = perm[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        t0 = time.perf_counter()
        stepper.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        t1 = time.perf_counter()
        stepper.step()
        t2 = time.perf_counter()
        step_times.append(t2 - t1)
        iter_times.append(t2 - t0)
        batch_loss = float(loss.detach())
        result.batch_loss.append(batch_loss)
        if not math.isfinite(batch_loss):
            result.error = f"loss became {batch_loss} at step {step}"
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
            if hasattr(bar, "set_postfix"):
                # refresh=False: the bar's own redraw interval applies (a log file gets few lines)
                bar.set_postfix(train=f"{result.train_loss[-1]:.3f}", val_acc=f"{result.val_acc[-1]:.3f}", refresh=False)
    result.seconds = time.perf_counter() - start
    if step_times:
        result.step_ms = 1e3 * statistics.median(step_times)
        result.iter_ms = 1e3 * statistics.median(iter_times)
    # The optimizer that stepped holds the state (a compiled twin keeps its own).
    stepped = stepper if isinstance(stepper, torch.optim.Optimizer) else opt
    result.state_bytes_per_param = state_bytes(stepped) / n_params
    if hasattr(stepped, "get_offline_stats") and "critical_test" in stepped.defaults:
        stats = stepped.get_offline_stats()
        result.admitted = stats["accepted"] / stats["offers"] if stats["offers"] else math.nan
    return result


HEADERS = ["optimizer", "lr", "train loss", "train acc", "val loss", "val acc", "step ms", "iter ms", "state B/param", "admitted"]


def table_rows(results: list[RunResult]) -> list[list[Any]]:
    rows = []
    for r in results:
        rows.append(
            [
                r.optimizer + (" (compiled)" if r.mode == "compiled" else "") + (" !" if r.error else ""),
                float(r.hyper["lr"]),
                r.final("train_loss"),
                r.final("train_acc"),
                r.final("val_loss"),
                r.final("val_acc"),
                r.step_ms,
                r.iter_ms,
                f"{r.state_bytes_per_param:.1f}",
                "-" if r.admitted is None else f"{100 * r.admitted:.0f}%",
            ]
        )
    return rows


def plot(results: list[RunResult], cfg: DemoConfig) -> list[Path]:
    plt = common.pyplot()
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    width = max(1, cfg.steps // 50)
    for r in results:
        (line,) = axes[0].plot(range(1, len(r.batch_loss) + 1), common.running_mean(r.batch_loss, width), label=r.optimizer, lw=1.4)
        axes[0].plot(r.steps, r.train_loss, color=line.get_color(), lw=0.8, ls=":")
        axes[1].plot(r.steps, r.val_loss, color=line.get_color(), label=r.optimizer, lw=1.4)
        axes[2].plot(r.steps, [100 * a for a in r.val_acc], color=line.get_color(), label=r.optimizer, lw=1.4)
    axes[0].set_title(f"training loss (solid: mini-batch, mean of {width}; dotted: full set)")
    axes[1].set_title("validation loss")
    axes[2].set_title("validation accuracy")
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("cross-entropy")
    axes[2].set_ylabel("accuracy (%)")
    axes[2].set_ylim(40, 101)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right center", fontsize=9)
    fig.suptitle(f"two spirals ({cfg.n_train} train / {cfg.n_val} validation), 2-{cfg.hidden}-{cfg.hidden}-2 MLP, batch {cfg.batch_size}, seed {cfg.seed}")
    path = cfg.out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    names = [r.optimizer for r in results]
    ax.barh(names, [r.state_bytes_per_param for r in results], color="tab:gray")
    for i, r in enumerate(results):
        ax.text(r.state_bytes_per_param, i, f" {r.state_bytes_per_param:.1f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("optimizer state bytes per parameter (float32)")
    ax.set_title("optimizer memory, measured from the state tensors")
    path = cfg.out / "state_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def write_results(results: list[RunResult], cfg: DemoConfig) -> list[Path]:
    csv_path = common.write_csv(
        cfg.out / "results.csv",
        HEADERS,
        (
            [r.optimizer, r.hyper["lr"], r.final("train_loss"), r.final("train_acc"), r.final("val_loss"), r.final("val_acc"),
             r.step_ms, r.iter_ms, r.state_bytes_per_param, "" if r.admitted is None else r.admitted]
            for r in results
        ),
    )
    json_path = cfg.out / "curves.json"
    json_path.write_text(
        json.dumps(
            {
                "config": {k: (str(v) if isinstance(v, Path) else common.jsonable(v)) for k, v in cfg.__dict__.items()},
                "runs": [{k: common.jsonable(v) if k == "hyper" else v for k, v in r.__dict__.items()} for r in results],
            },
            indent=1,
        )
    )
    return [csv_path, json_path]


def run(cfg: DemoConfig, log: Callable[[str], None] = print) -> int:
    """The whole demo: train, print the table, write plots and results; returns the exit status."""
    wrap = compile_optimizer if cfg.compiled else None
    common.prepare_out(cfg.out)
    common.pyplot()  # fail before training if plots are impossible
    data = make_data(cfg)
    progress = common.progress_factory(not cfg.progress)
    n_params = sum(p.numel() for p in small_mlp(cfg.seed, cfg.hidden).parameters())
    log(
        f"demo: two spirals, {cfg.n_train} train / {cfg.n_val} validation points, MLP 2-{cfg.hidden}-{cfg.hidden}-2 "
        f"({n_params} parameters), {cfg.steps} steps of batch {cfg.batch_size}, seed {cfg.seed}"
    )
    if cfg.compiled:
        log("--compiled: the memory optimizers step through memopt_func.compiled.compile_optimizer; torch.optim ones stay eager")
    for name, hyper in cfg.hyper.items():
        log(f"--set {name}:{common.format_hyper(hyper)}")
    results = []
    for name in cfg.optimizers:
        try:
            results.append(train_one(name, cfg, data, wrap, progress))
        except Exception as e:  # one broken optimizer must not hide the others' results
            results.append(RunResult(name, demo_hyper(name), "eager", [], [], [], [], [], [], math.nan, math.nan, 0.0, math.nan, None, error=f"{type(e).__name__}: {e}"))
    log("")
    log(common.format_table(HEADERS, table_rows(results)))
    log(
        "step ms / iter ms: median wall time of optimizer.step() / of a whole iteration; state B/param: bytes of the "
        "optimizer's state tensors per parameter; admitted: share of critical-buffer offers admitted"
    )
    failed = [r for r in results if r.error]
    for r in failed:
        log(f"! {r.optimizer}: {r.error}")
    trained = [r for r in results if r.steps]
    paths = (plot(trained, cfg) if trained else []) + write_results(results, cfg)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 1 if failed else 0

