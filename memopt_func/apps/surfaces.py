"""``memopt-func surfaces``: the exploration experiment of the critical-momenta paper on 2-D functions.

Many random starts per optimizer on Ackley, Goldstein-Price, Rosenbrock and Himmelblau; the
measure is how often a run ends in the basin of a global minimum (within ``radius`` of a global
minimiser, per function) and the distribution of final losses.

Every start is an independent run: the starts are separate 2-element leaves of one functional
rule's pytree, with ``synced=False`` for the critical-buffer rules so that each leaf keeps its own
priorities and buffer. (One ``[N, 2]`` tensor would not do: the priority is the norm of the whole
tensor, which would couple the runs.) Per-leaf Adam/AdEMAMix arithmetic is element-wise, so the
leaves do not interact there either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import catalog, common
from ..rules import RULES


def ackley(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    # The tiny offset keeps the gradient finite at the origin itself (the value moves by ~1e-9).
    r = torch.sqrt(0.5 * (x * x + y * y) + 1e-20)
    return -20 * torch.exp(-0.2 * r) - torch.exp(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))) + math.e + 20


def goldstein_price(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    a = 1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x * x - 14 * y + 6 * x * y + 3 * y * y)
    b = 30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x * x + 48 * y - 36 * x * y + 27 * y * y)
    return a * b


def rosenbrock(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def himmelblau(p: Tensor) -> Tensor:
    x, y = p[..., 0], p[..., 1]
    return (x * x + y - 11) ** 2 + (x + y * y - 7) ** 2


@dataclass(frozen=True)
class Surface:
    """A 2-D test function, where its global minima are, and how the experiment treats it."""

    name: str
    fn: Callable[[Tensor], Tensor]
    minimizers: tuple[tuple[float, float], ...]
    f_min: float
    bounds: tuple[tuple[float, float], tuple[float, float]]  # starts are drawn uniformly here
    radius: float  # the global basin: within this distance of a global minimiser
    lr: float  # for the adaptive rules (Adam family, RMSprop, AdEMAMix)
    sgd_lr: float  # for SGD / SGD_C, whose steps scale with the gradient
    log_contours: bool

    def value(self, p: Tensor) -> Tensor:
        return self.fn(p)


SURFACES: dict[str, Surface] = {
    s.name: s
    for s in (
        # Local minima sit near the integer lattice; the nearest are ~0.95 from the origin.
        Surface("ackley", ackley, ((0.0, 0.0),), 0.0, ((-4.0, 4.0), (-4.0, 4.0)), 0.4, 0.05, 0.1, False),
        # Local minima at (-0.6, -0.4), (1.8, 0.2), (1.2, 0.8); the nearest is 0.85 away.
        Surface("goldstein_price", goldstein_price, ((0.0, -1.0),), 3.0, ((-2.0, 2.0), (-2.0, 2.0)), 0.3, 0.02, 1e-5, True),
        # One minimum at the end of a curved valley: "basin" here means having reached it.
        Surface("rosenbrock", rosenbrock, ((1.0, 1.0),), 0.0, ((-2.0, 2.0), (-1.0, 3.0)), 0.1, 0.02, 1e-3, True),
        # Four global minima, all f = 0.
        Surface(
            "himmelblau",
            himmelblau,
            ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)),
            0.0,
            ((-5.0, 5.0), (-5.0, 5.0)),
            0.3,
            0.02,
            3e-3,
            True,
        ),
    )
}

DEFAULT_OPTIMIZERS = catalog.DEFAULT


@dataclass
class SurfacesConfig:
    functions: list[str] = field(default_factory=lambda: list(SURFACES))
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS))
    starts: int = 32
    steps: int = 500
    seed: int = 0
    lr: dict[str, float] = field(default_factory=dict)
    shown: int = 8
    out: Path = Path("memopt_out/surfaces")
    progress: bool = True


@dataclass
class SurfaceRun:
    function: str
    optimizer: str
    lr: float
    trajectories: Tensor  # [steps + 1, starts, 2]
    final_loss: Tensor  # [starts], f - f_min
    in_basin: Tensor  # [starts] bool

    @property
    def success(self) -> float:
        return float(self.in_basin.double().mean())

    def quantile(self, q: float) -> float:
        finite = self.final_loss[torch.isfinite(self.final_loss)]
        return float(torch.quantile(finite, q)) if finite.numel() else math.nan


def rule_for(name: str, surface: Surface, overrides: dict[str, float]):
    """The functional rule ``name`` for ``surface``, with per-start (unsynced) critical buffers."""
    cls = RULES[name]
    default_lr = surface.sgd_lr if name in ("SGD", "SGD_C") else surface.lr
    hyper: dict[str, Any] = {"lr": common.resolve_lr(name, default_lr, overrides)}
    if any(h.name == "synced" for h in cls.HYPERS):
        hyper["synced"] = False
    return cls(**hyper)


def starts(surface: Surface, n: int, seed: int) -> Tensor:
    """``n`` starting points drawn uniformly in the surface's bounds: [n, 2] float64."""
    gen = torch.Generator().manual_seed(seed)
    (x0, x1), (y0, y1) = surface.bounds
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    return torch.stack([x0 + (x1 - x0) * u[:, 0], y0 + (y1 - y0) * u[:, 1]], dim=1)


def in_basin(surface: Surface, points: Tensor) -> Tensor:
    minimizers = torch.tensor(surface.minimizers, dtype=points.dtype)
    dist = torch.cdist(points, minimizers).min(dim=1).values
    return torch.isfinite(dist) & (dist <= surface.radius)


def run_rule(surface: Surface, rule, start: Tensor, steps: int, progress: Callable = common.quiet_progress, desc: str = "") -> Tensor:
    """Run ``rule`` from every row of ``start`` independently; the path as [steps + 1, n, 2]."""
    points = [row.clone() for row in start]
    state = rule.init(points)
    path = torch.empty(steps + 1, len(points), 2, dtype=start.dtype)
    path[0] = start
    for t in progress(range(1, steps + 1), total=steps, desc=desc):
        stacked = torch.stack(points).requires_grad_(True)
        (grad,) = torch.autograd.grad(surface.value(stacked).sum(), stacked)
        with torch.no_grad():
            points, state = rule.step(points, list(grad.unbind(0)), state)
        path[t] = torch.stack(points)
    return path


def run_one(surface: Surface, name: str, cfg: SurfacesConfig, progress: Callable = common.quiet_progress) -> SurfaceRun:
    rule = rule_for(name, surface, cfg.lr)
    path = run_rule(surface, rule, starts(surface, cfg.starts, cfg.seed), cfg.steps, progress, f"{surface.name[:12]:<12} {name:<9}")
    final = path[-1]
    with torch.no_grad():
        loss = surface.value(final) - surface.f_min
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
    return SurfaceRun(surface.name, name, float(rule.hyper["lr"]), path, loss, in_basin(surface, final))


HEADERS = ["function", "optimizer", "lr", "in global basin", "median f-f*", "q25", "q75", "max"]


def table_rows(runs: list[SurfaceRun]) -> list[list[Any]]:
    rows = []
    for r in runs:
        n = r.in_basin.numel()
        rows.append(
            [r.function, r.optimizer, r.lr, f"{int(r.in_basin.sum())}/{n} ({100 * r.success:.0f}%)", r.quantile(0.5), r.quantile(0.25), r.quantile(0.75), float(r.final_loss.max())]
        )
    return rows


def _grid(surface: Surface, n: int = 300) -> tuple[Tensor, Tensor, Tensor]:
    (x0, x1), (y0, y1) = surface.bounds
    pad_x, pad_y = 0.05 * (x1 - x0), 0.05 * (y1 - y0)
    xs = torch.linspace(x0 - pad_x, x1 + pad_x, n, dtype=torch.float64)
    ys = torch.linspace(y0 - pad_y, y1 + pad_y, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = surface.value(torch.stack([gx, gy], dim=-1)) - surface.f_min
    return gx, gy, z


def plot_surface(surface: Surface, runs: list[SurfaceRun], cfg: SurfacesConfig) -> Path:
    """Trajectories of the first ``cfg.shown`` starts over the function's contours, one panel per optimizer."""
    plt = common.pyplot()
    from matplotlib import colors

    n = len(runs)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False, constrained_layout=True)
    gx, gy, z = _grid(surface)
    if surface.log_contours:
        levels = torch.logspace(math.log10(max(float(z.min()), 1e-3)), math.log10(float(z.max())), 25).tolist()
        norm = colors.LogNorm(vmin=levels[0], vmax=levels[-1])
        z = z.clamp_min(levels[0])
    else:
        levels = torch.linspace(float(z.min()), float(z.max()), 25).tolist()
        norm = None
    (x0, x1), (y0, y1) = surface.bounds
    pad_x, pad_y = 0.05 * (x1 - x0), 0.05 * (y1 - y0)
    shown = min(cfg.shown, cfg.starts)
    cmap = plt.get_cmap("tab10")
    for ax, run in zip(axes.flat, runs):
        ax.contourf(gx.numpy(), gy.numpy(), z.numpy(), levels=levels, norm=norm, cmap="Greys_r", alpha=0.55)
        ax.contour(gx.numpy(), gy.numpy(), z.numpy(), levels=levels, norm=norm, colors="k", linewidths=0.25, alpha=0.5)
        for mx, my in surface.minimizers:
            ax.plot(mx, my, "*", color="gold", ms=11, mec="k", mew=0.6, zorder=2)
            ax.add_patch(plt.Circle((mx, my), surface.radius, fill=False, ls="--", color="darkorange", lw=1, zorder=2))
        for i in range(shown):
            path = run.trajectories[:, i]
            ok = torch.isfinite(path).all(dim=1)
            path = path[ok].numpy()
            color = cmap(i % 10)
            ax.plot(path[:, 0], path[:, 1], color=color, lw=1.0, alpha=0.9, zorder=3)
            ax.plot(path[0, 0], path[0, 1], "o", color=color, ms=4, zorder=4)
            ax.plot(path[-1, 0], path[-1, 1], "x" if run.in_basin[i] else "s", color=color, ms=7, mew=2, mfc="none", zorder=4)
        ax.set_xlim(x0 - pad_x, x1 + pad_x)
        ax.set_ylim(y0 - pad_y, y1 + pad_y)
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(f"{run.optimizer} (lr {run.lr:g}): {100 * run.success:.0f}% in basin", fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        f"{surface.name}: {shown} of {cfg.starts} starts, {cfg.steps} steps, seed {cfg.seed} "
        "(o start, x end in global basin, □ end elsewhere, ★ global minimiser, dashed: basin)"
    )
    path = cfg.out / f"trajectories_{surface.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_summary(runs: list[SurfaceRun], cfg: SurfacesConfig) -> Path:
    """Per function: share of runs in the global basin (bars) and the final-loss spread (box plots)."""
    plt = common.pyplot()
    functions = list(dict.fromkeys(r.function for r in runs))
    fig, axes = plt.subplots(2, len(functions), figsize=(4.2 * len(functions), 7.0), squeeze=False, constrained_layout=True)
    for j, fname in enumerate(functions):
        rs = [r for r in runs if r.function == fname]
        names = [r.optimizer for r in rs]
        ax = axes[0, j]
        ax.bar(names, [100 * r.success for r in rs], color="tab:blue")
        ax.set_ylim(0, 105)
        ax.set_title(f"{fname}: runs ending in global basin")
        ax.set_ylabel("%")
        ax.tick_params(axis="x", rotation=45)
        ax = axes[1, j]
        data = [r.final_loss[torch.isfinite(r.final_loss)].clamp_min(1e-16).numpy() for r in rs]
        ax.boxplot(data, tick_labels=names, showfliers=True)
        ax.set_yscale("log")
        ax.set_title(f"{fname}: final f - f*")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{cfg.starts} starts, {cfg.steps} steps, seed {cfg.seed}")
    path = cfg.out / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(runs: list[SurfaceRun], cfg: SurfacesConfig) -> list[Path]:
    csv_path = common.write_csv(
        cfg.out / "results.csv",
        ["function", "optimizer", "lr", "success", "median", "q25", "q75", "max"],
        ([r.function, r.optimizer, r.lr, r.success, r.quantile(0.5), r.quantile(0.25), r.quantile(0.75), float(r.final_loss.max())] for r in runs),
    )
    json_path = cfg.out / "final_points.json"
    json_path.write_text(
        json.dumps(
            {
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                "runs": [
                    {"function": r.function, "optimizer": r.optimizer, "lr": r.lr, "final": r.trajectories[-1].tolist(),
                     "final_loss": r.final_loss.tolist(), "in_basin": r.in_basin.tolist()}
                    for r in runs
                ],
            },
            indent=1,
        )
    )
    return [csv_path, json_path]


def run(cfg: SurfacesConfig, log: Callable[[str], None] = print) -> int:
    """The whole experiment: run, print the table, write plots and results; returns the exit status."""
    common.prepare_out(cfg.out)
    common.pyplot()
    progress = common.progress_factory(not cfg.progress)
    log(
        f"surfaces: {cfg.starts} independent starts per optimizer, {cfg.steps} steps, seed {cfg.seed} "
        "(starts uniform in each function's box, the same for every optimizer)"
    )
    for name in cfg.functions:
        s = SURFACES[name]
        log(f"  {name}: box x{list(s.bounds[0])} y{list(s.bounds[1])}, global basin = within {s.radius} of {list(s.minimizers)}")
    runs: list[SurfaceRun] = []
    paths: list[Path] = []
    for fname in cfg.functions:
        surface = SURFACES[fname]
        mine = [run_one(surface, name, cfg, progress) for name in cfg.optimizers]
        runs += mine
        paths.append(plot_surface(surface, mine, cfg))
    log("")
    log(common.format_table(HEADERS, table_rows(runs), left=2))
    log("f-f*: final loss above the global minimum over all starts (median and quartiles); inf: the run diverged")
    paths.append(plot_summary(runs, cfg))
    paths += write_results(runs, cfg)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


# --- the AdEMAMix paper's Rosenbrock toy ------------------------------------------------------


@dataclass
class RosenbrockToyConfig:
    """One start, one learning rate: Adam over a range of beta1 against AdEMAMix over beta3.

    AdEMAMix runs with beta1 = 0 (its fast EMA is the gradient itself), so its beta3 schedule
    starts from 0 and reaches beta3 at the last step; alpha warms up over the whole run too.
    """

    steps: int = 20000
    lr: float = 0.003
    start: tuple[float, float] = (-3.0, 5.0)
    adam_beta1: tuple[float, ...] = (0.9, 0.99, 0.999, 0.9999)
    ademamix_beta3: tuple[float, ...] = (0.999, 0.9999)
    alpha: float = 2.0
    beta2: float = 0.999
    out: Path = Path("memopt_out/surfaces")
    progress: bool = True


def toy_rules(cfg: RosenbrockToyConfig) -> list[tuple[str, Any]]:
    """(label, functional rule) for every run of the toy."""
    runs: list[tuple[str, Any]] = [(f"Adam b1={b1:g}", RULES["Adam"](lr=cfg.lr, betas=(b1, cfg.beta2))) for b1 in cfg.adam_beta1]
    for b3 in cfg.ademamix_beta3:
        rule = RULES["AdEMAMix"](
            lr=cfg.lr, betas=(0.0, cfg.beta2, b3), alpha=cfg.alpha, beta3_warmup=cfg.steps, alpha_warmup=cfg.steps
        )
        runs.append((f"AdEMAMix b3={b3:g}", rule))
    return runs


def distances(path: Tensor, surface: Surface) -> Tensor:
    """Distance of each point of ``path`` [steps + 1, 2] to the nearest global minimiser."""
    return torch.cdist(path, torch.tensor(surface.minimizers, dtype=path.dtype)).min(dim=1).values


TOY_HEADERS = ["run", "dist @ N/4", "dist @ N/2", "dist @ 3N/4", "dist @ N", "f @ N"]


def run_toy(cfg: RosenbrockToyConfig, log: Callable[[str], None] = print) -> int:
    """Run the toy, print distances to the minimum, plot trajectories and distance curves."""
    common.prepare_out(cfg.out)
    plt = common.pyplot()
    surface = SURFACES["rosenbrock"]
    progress = common.progress_factory(not cfg.progress)
    log(
        f"surfaces --rosenbrock-toy: Rosenbrock from {cfg.start}, lr {cfg.lr:g}, {cfg.steps} steps; Adam betas (b1, {cfg.beta2:g}); "
        f"AdEMAMix betas (0, {cfg.beta2:g}, b3), alpha {cfg.alpha:g}, beta3 and alpha warmed up over all {cfg.steps} steps"
    )
    start = torch.tensor([cfg.start], dtype=torch.float64)
    paths = {label: run_rule(surface, rule, start, cfg.steps, progress, f"{label:<18}")[:, 0] for label, rule in toy_rules(cfg)}
    dist = {label: distances(p, surface) for label, p in paths.items()}
    marks = [cfg.steps // 4, cfg.steps // 2, 3 * cfg.steps // 4, cfg.steps]
    rows = [[label, *(float(d[m]) for m in marks), float(surface.value(paths[label][-1]))] for label, d in dist.items()]
    log("")
    log(common.format_table(TOY_HEADERS, rows))
    log(f"dist @ k: distance to the minimum (1, 1) after k of N = {cfg.steps} steps; f @ N: the final value (minimum 0)")

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), constrained_layout=True)
    finite = torch.cat([p[torch.isfinite(p).all(dim=1)] for p in paths.values()])
    (x0, y0), (x1, y1) = finite.min(dim=0).values.tolist(), finite.max(dim=0).values.tolist()
    x0, x1 = max(min(x0, 0.5), -6.0) - 0.5, min(max(x1, 1.5), 6.0) + 0.5
    y0, y1 = max(min(y0, 0.5), -4.0) - 0.5, min(max(y1, 1.5), 12.0) + 0.5
    xs = torch.linspace(x0, x1, 300, dtype=torch.float64)
    ys = torch.linspace(y0, y1, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = surface.value(torch.stack([gx, gy], dim=-1)).clamp_min(1e-3)
    levels = torch.logspace(-3, math.log10(float(z.max())), 25).tolist()
    from matplotlib import colors

    groups = [("Adam", [k for k in paths if k.startswith("Adam ")]), ("AdEMAMix", [k for k in paths if k.startswith("AdEMAMix")])]
    cmap = plt.get_cmap("tab10")
    color = {label: cmap(i % 10) for i, label in enumerate(paths)}
    for ax, (title, labels) in zip(axes[:2], groups):
        ax.contourf(gx.numpy(), gy.numpy(), z.numpy(), levels=levels, norm=colors.LogNorm(), cmap="Greys_r", alpha=0.55)
        ax.contour(gx.numpy(), gy.numpy(), z.numpy(), levels=levels, norm=colors.LogNorm(), colors="k", linewidths=0.25, alpha=0.5)
        for label in labels:
            p = paths[label]
            p = p[torch.isfinite(p).all(dim=1)].numpy()
            ax.plot(p[:, 0], p[:, 1], color=color[label], lw=1.1, label=label)
            ax.plot(p[-1, 0], p[-1, 1], "x", color=color[label], ms=8, mew=2)
        ax.plot(*cfg.start, "o", color="k", ms=5)
        ax.plot(1.0, 1.0, "*", color="gold", ms=13, mec="k", mew=0.6)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{title}: trajectories (o start, x end, star minimum)", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    steps = torch.arange(cfg.steps + 1)
    for label, d in dist.items():
        axes[2].plot(steps.numpy(), d.clamp_min(1e-8).numpy(), color=color[label], lw=1.2, label=label)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("distance to the minimum")
    axes[2].set_title("distance to (1, 1)", fontsize=10)
    axes[2].grid(True, alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"Rosenbrock from {cfg.start}, lr {cfg.lr:g}, {cfg.steps} steps; AdEMAMix: beta1 0, alpha {cfg.alpha:g}, beta3 and alpha warmed up over the run")
    png = cfg.out / "rosenbrock_toy.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)

    every = max(1, cfg.steps // 1000)
    csv_path = common.write_csv(
        cfg.out / "rosenbrock_toy.csv",
        ["run", "step", "x", "y", "distance"],
        ([label, t, float(p[t, 0]), float(p[t, 1]), float(dist[label][t])] for label, p in paths.items() for t in range(0, cfg.steps + 1, every)),
    )
    log(f"wrote {png}, {csv_path}")
    return 0
