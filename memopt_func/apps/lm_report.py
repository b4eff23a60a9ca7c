"""``memopt-func lm``'s results: per optimizer over its seeds, the table, the figure and the files."""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import common
from .lm_dist import Dist
from .lm_model import VOCAB, make_model

if TYPE_CHECKING:
    from .lm import LMConfig, Run
    from .lm_data import Corpus

BASELINE = "AdamW"


@dataclass
class Summary:
    """One optimizer over its seeds."""

    optimizer: str
    lr: float
    mode: str
    runs: list[Run]
    steps: list[int]
    mean_val: list[float]
    std_val: list[float]

    @property
    def final_mean(self) -> float:
        return self.mean_val[-1] if self.mean_val else math.nan

    @property
    def final_std(self) -> float:
        return self.std_val[-1] if self.std_val else math.nan

    @property
    def failed(self) -> bool:
        return any(r.error for r in self.runs)

    def tokens_per_s(self, cfg: LMConfig) -> float:
        times = [r.iter_s for r in self.runs if math.isfinite(r.iter_s)]
        return cfg.tokens_per_step / statistics.fmean(times) if times else math.nan


def summarize(runs: list[Run], name: str) -> Summary:
    mine = [r for r in runs if r.optimizer == name]
    complete = [r for r in mine if not r.error]
    steps = complete[0].steps if complete else []
    curves = [r.val_loss for r in complete]
    mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
    std = [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else math.nan for i in range(len(steps))]
    return Summary(name, mine[0].lr, mine[0].mode, mine, steps, mean, std)


def tokens_to_target(steps: Sequence[int], curve: Sequence[float], target: float, tokens_per_step: int) -> float | None:
    """Training tokens at which ``curve`` (evaluated at ``steps``) first reaches ``target``,
    linear between evaluations; None if it never does."""
    for i, value in enumerate(curve):
        if value <= target:
            if i == 0:
                return float(steps[0] * tokens_per_step)
            v0, v1 = curve[i - 1], value
            s = steps[i - 1] + (steps[i] - steps[i - 1]) * ((v0 - target) / (v0 - v1) if v0 != v1 else 1.0)
            return s * tokens_per_step
    return None


def _tokens(n: float | None) -> str:
    if n is None:
        return "not reached"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:.0f}"


HEADERS = ["optimizer", "lr", "val loss", "tokens to target", "vs baseline", "tokens/s", "state B/param"]


def result_rows(summaries: list[Summary], cfg: LMConfig) -> tuple[list[list[Any]], str | None, float]:
    """Table rows, the baseline's name and the target loss (its final mean validation loss)."""
    names = [s.optimizer for s in summaries]
    base_name = BASELINE if BASELINE in names else (names[0] if names else None)
    base = next((s for s in summaries if s.optimizer == base_name), None)
    target = base.final_mean if base is not None else math.nan
    base_tokens = tokens_to_target(base.steps, base.mean_val, target, cfg.tokens_per_step) if base and math.isfinite(target) else None
    rows = []
    for s in summaries:
        reached = tokens_to_target(s.steps, s.mean_val, target, cfg.tokens_per_step) if math.isfinite(target) else None
        val = "-" if not s.mean_val else f"{s.final_mean:.4f}" + (f" +- {s.final_std:.4f}" if math.isfinite(s.final_std) else "")
        ratio = f"{reached / base_tokens:.2f}x" if reached is not None and base_tokens else "-"
        bpp = statistics.fmean(r.state_bytes_per_param for r in s.runs) if s.runs else math.nan
        rows.append(
            [
                s.optimizer + (" (compiled)" if s.mode == "compiled" else "") + (" !" if s.failed else ""),
                s.lr,
                val,
                _tokens(reached) if math.isfinite(target) else "-",
                ratio,
                f"{s.tokens_per_s(cfg):,.0f}",
                f"{bpp:.1f}",
            ]
        )
    return rows, base_name, target


def plot(summaries: list[Summary], cfg: LMConfig, target: float, base_name: str | None, corpus: Corpus) -> Path:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
    scale = cfg.tokens_per_step / 1e6
    width = max(1, cfg.steps // 40)
    tops = []
    for s in summaries:
        if not s.steps:
            continue
        tokens = [st * scale for st in s.steps]
        (line,) = axes[0].plot(tokens, s.mean_val, lw=1.6, label=f"{s.optimizer} (lr {s.lr:g})")
        if len(s.runs) > 1:
            lo = [m - d for m, d in zip(s.mean_val, s.std_val)]
            hi = [m + d for m, d in zip(s.mean_val, s.std_val)]
            axes[0].fill_between(tokens, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        reached = tokens_to_target(s.steps, s.mean_val, target, cfg.tokens_per_step) if math.isfinite(target) else None
        if reached is not None:
            axes[0].plot([reached / 1e6], [target], "o", color=line.get_color(), ms=6, mec="k", mew=0.6)
        tops.append(s.mean_val[min(len(s.mean_val) - 1, max(1, len(s.mean_val) // 5))])
        complete = [r for r in s.runs if not r.error]
        n = min(len(r.batch_loss) for r in complete) if complete else 0
        if n:
            mean_batch = [statistics.fmean(r.batch_loss[i] for r in complete) for i in range(n)]
            axes[1].plot([(i + 1) * scale for i in range(n)], common.running_mean(mean_batch, width), color=line.get_color(), lw=1.2, label=s.optimizer)
    if math.isfinite(target):
        axes[0].axhline(target, color="k", ls="--", lw=0.8, label=f"{base_name}'s final ({target:.3f})")
    finals = [s.final_mean for s in summaries if s.mean_val and math.isfinite(s.final_mean)]
    tops = [t for t in tops if math.isfinite(t)]
    if finals and tops:
        # From the best final loss up to the curves a fifth of the way in: the end of the run,
        # where the optimizers differ, fills the panel.
        low, high = min(finals), min(max(tops), math.log(VOCAB))
        pad = 0.05 * max(high - low, 1e-3)
        axes[0].set_ylim(low - pad, high + pad)
        axes[1].set_ylim(low - 4 * pad, high + 4 * pad)
    seeds = f"mean of {cfg.seeds} seeds, band +- 1 std" if cfg.seeds > 1 else "1 seed"
    axes[0].set_title(f"validation loss ({seeds}); dot: reaches the dashed target")
    axes[1].set_title(f"training loss (running mean of {width} batches, mean over seeds)")
    for ax in axes:
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("cross-entropy (nats per byte)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=9)
    n_params = sum(p.numel() for p in make_model(cfg, 0).parameters())
    fig.suptitle(
        f"byte-level GPT ({n_params / 1e6:.2f}M parameters: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, "
        f"context {cfg.context}), batch {cfg.batch_size}, {cfg.steps} steps; {corpus.name}",
        fontsize=10,
    )
    path = cfg.out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def config_dict(cfg: LMConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else common.jsonable(v) if k == "hyper" else v) for k, v in asdict(cfg).items()}


def write_results(runs: list[Run], rows: list[list[Any]], cfg: LMConfig, corpus: Corpus, target: float, dd: Dist = Dist()) -> list[Path]:
    curves_csv = cfg.out / "curves.csv"
    common.write_csv(
        curves_csv,
        ["optimizer", "seed", "lr", "step", "tokens", "val_loss", "train_loss"],
        (
            [r.optimizer, r.seed, r.lr, step, step * cfg.tokens_per_step, val, "" if math.isnan(train) else train]
            for r in runs
            for step, val, train in zip(r.steps, r.val_loss, r.train_loss)
        ),
    )
    results_csv = common.write_csv(cfg.out / "results.csv", HEADERS, rows)
    json_path = cfg.out / "curves.json"
    json_path.write_text(
        json.dumps(
            {
                "config": config_dict(cfg),
                "corpus": corpus.description,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "world_size": dd.world,
                "target_val_loss": target,
                "runs": [asdict(r) for r in runs],
            },
            indent=1,
        )
    )
    return [curves_csv, results_csv, json_path]
