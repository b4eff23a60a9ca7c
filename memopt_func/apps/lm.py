"""``memopt-func lm``: a small GPT trained byte-level on real text with each optimizer, side by side.

Data: by default the Python standard library's own ``.py`` files (found through ``sysconfig``,
so every machine has them offline), sorted by path and split into train and validation by file
with a fixed seed; ``--data PATH`` takes any text file or folder instead. Tokens are bytes
(vocabulary 256). Model: a pre-norm decoder (causal ``scaled_dot_product_attention``, GELU MLP,
learned positions, the output layer tied to the byte embedding). Every optimizer trains from the
same initial weights on the same batches at a given seed, under the same warm-up + cosine
learning-rate schedule, each at its own learning rate.

Reported per optimizer: final validation loss (mean and standard deviation over seeds), tokens
per second (median iteration), optimizer-state bytes per parameter, and tokens-to-target: how
many training tokens its mean validation curve needs to reach the baseline's (AdamW's) final
validation loss, interpolated linearly between evaluations.

Distributed (``--ddp``, ``--fsdp``, under ``torchrun``): the same training loop on every rank,
the model wrapped in ``DistributedDataParallel`` or sharded by FSDP2's ``fully_shard`` (each block,
then the root). Every rank draws the same global batch and trains on its own equal slice of the
sequences; both wrappers average the gradients over the ranks, so a step sees the gradient of
the whole batch, as in one process. Validation windows are split over the ranks and the loss
sums all-reduced, so every rank holds the same validation loss. Only rank 0 prints and writes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..compiled import compile_optimizer
from . import catalog, common
from .benchmarking import state_bytes
from .lm_data import (  # noqa: F401  (lm's names, as before the split)
    SPLIT_SEED,
    Corpus,
    check_corpus,
    eval_windows,
    load_corpus,
    sample_batch,
    split_files,
    stdlib_files,
    stdlib_root,
)
from .lm_dist import DIST_TIMEOUT_S, Dist, distributed  # noqa: F401
from .lm_model import GPT, VOCAB, Block, CausalSelfAttention, lm_loss, make_model  # noqa: F401
from .lm_report import (  # noqa: F401
    BASELINE,
    HEADERS,
    config_dict,
    Summary,
    plot,
    result_rows,
    summarize,
    tokens_to_target,
    write_results,
)

OPTIMIZERS = ("AdamW", "AdEMAMix", "Adam", "Adam_CM", "Adam_C")

# Per optimizer, everything but the learning rate (which comes from the preset's sweep). The
# Adam family shares betas (0.9, 0.999) and eps; the decoupled-decay optimizers (AdamW,
# AdEMAMix, Adam_CM) decay the matrices by 0.1, the coupled-L2 ones (Adam, Adam_C) run without
# decay, as torch.optim.Adam's default. The critical-buffer optimizers keep their published
# defaults (topC, decay). AdEMAMix follows its paper's recipe scaled down: beta3 = 0.9999,
# alpha = 5, and both warm-ups (``beta3_warmup``, ``alpha_warmup``) over the whole run.
LM_HYPER: dict[str, dict[str, Any]] = {
    "AdamW": dict(betas=(0.9, 0.999), weight_decay=0.1),
    "AdEMAMix": dict(betas=(0.9, 0.999, 0.9999), alpha=5.0, weight_decay=0.1),
    "Adam": dict(betas=(0.9, 0.999)),
    "Adam_CM": dict(betas=(0.9, 0.999), weight_decay=0.1),
    "Adam_C": dict(betas=(0.9, 0.999)),
}


@dataclass(frozen=True)
class Preset:
    """A named set of sizes and lengths, with each optimizer's learning rate from its sweep."""

    steps: int
    batch_size: int
    context: int
    d_model: int
    layers: int
    heads: int
    seeds: int
    eval_every: int
    eval_tokens: int
    lr: dict[str, float]


PRESETS: dict[str, Preset] = {
    # About a minute of training for the five optimizers on 2 CPU cores (make demo).
    "quick": Preset(
        steps=300, batch_size=16, context=64, d_model=64, layers=2, heads=2, seeds=1, eval_every=30, eval_tokens=8192,
        lr={"AdamW": 4e-3, "AdEMAMix": 2e-3, "Adam": 4e-3, "Adam_CM": 2e-3, "Adam_C": 1e-3},
    ),
    # About 13 minutes on 2 CPU cores (longer when other work shares them); the figure in docs/guides/apps.md.
    "default": Preset(
        steps=360, batch_size=16, context=128, d_model=144, layers=4, heads=4, seeds=2, eval_every=30, eval_tokens=24576,
        lr={"AdamW": 2e-3, "AdEMAMix": 2e-3, "Adam": 2e-3, "Adam_CM": 2.5e-4, "Adam_C": 5e-4},
    ),
}

SWEEP_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)


@dataclass
class LMConfig:
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    preset: str = "default"
    steps: int = PRESETS["default"].steps
    batch_size: int = PRESETS["default"].batch_size
    context: int = PRESETS["default"].context
    d_model: int = PRESETS["default"].d_model
    layers: int = PRESETS["default"].layers
    heads: int = PRESETS["default"].heads
    seeds: int = PRESETS["default"].seeds
    seed: int = 0
    eval_every: int = PRESETS["default"].eval_every
    eval_tokens: int = PRESETS["default"].eval_tokens
    warmup: float = 0.1  # share of the steps spent warming the learning rate up
    min_lr_ratio: float = 0.1  # the cosine ends at this share of the peak learning rate
    val_fraction: float = 0.05
    data: Path | None = None
    lr: dict[str, float] = field(default_factory=dict)  # --lr overrides
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)  # --set overrides, by optimizer
    lr_sweep: bool = False
    sweep_lrs: list[float] = field(default_factory=lambda: list(SWEEP_LRS))
    compile: bool = False
    parallel: str | None = None  # "ddp" or "fsdp": one rank of a process group (see ``distributed``)
    storage: str = "fp32"  # optimizer state storage (``catalog.STORAGE``)
    out: Path = Path("memopt_out/lm")
    progress: bool = True

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LMConfig:
        p = PRESETS[name]
        sizes = {k: v for k, v in asdict(p).items() if k != "lr"}
        return cls(preset=name, **{**sizes, **overrides})

    def peak_lr(self, name: str) -> float:
        return common.resolve_lr(name, PRESETS[self.preset].lr[name], self.lr)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup * self.steps))

    def check(self) -> None:
        """CLIError for sizes that cannot make a model."""
        if self.d_model % self.heads:
            raise common.CLIError(f"--d-model {self.d_model} must be a multiple of --heads {self.heads}")
        if self.steps < 2:
            raise common.CLIError(f"--steps must be at least 2 (warm-up and cosine), got {self.steps}")
        if self.parallel == "fsdp" and self.compile:
            raise common.CLIError(
                "--compile does not combine with --fsdp: memopt_func.compiled does not step FSDP2's sharded (DTensor) "
                "parameters; use --fsdp without --compile, or --ddp --compile"
            )


# --- model -----------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (and embeddings) decay; gains and biases do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: LMConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then a cosine down to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def hyper_for(name: str, cfg: LMConfig, lr: float) -> dict[str, Any]:
    """The optimizer's settings in this run: ``LM_HYPER``'s (AdEMAMix's warm-ups over the whole
    run), then ``--set``'s, then the learning rate."""
    hyper = dict(LM_HYPER[name])
    if name == "AdEMAMix":
        hyper.update(beta3_warmup=cfg.steps, alpha_warmup=cfg.steps)
    return {**common.with_overrides(name, hyper, cfg.hyper.get(name, {})), "lr": lr}


def make_optimizer(name: str, model: nn.Module, cfg: LMConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` over the model's two param groups; under ``cfg.compile`` a drop-in
    becomes its compiled twin (``compile_optimizer``), and a torch.optim baseline gets a tensor
    learning rate, so that ``torch.compile(opt.step)`` never recompiles as the schedule moves."""
    hyper = hyper_for(name, cfg, lr)
    groups = param_groups(model, hyper.pop("weight_decay", 0.0))
    if cfg.compile and not catalog.is_memory(name) and cfg.storage == "fp32":
        # torch.optim takes a tensor lr only in its single-tensor form (torch.compile fuses it anyway).
        return getattr(torch.optim, name)(groups, foreach=False, **{**hyper, "lr": torch.tensor(lr)})
    opt = catalog.make_optimizer(name, groups, storage=cfg.storage, **hyper)
    return compile_optimizer(opt) if cfg.compile else opt


# --- training --------------------------------------------------------------------------------


@dataclass
class Run:
    optimizer: str
    seed: int
    lr: float
    mode: str
    steps: list[int] = field(default_factory=list)  # evaluation points
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # mean batch loss since the previous evaluation
    batch_loss: list[float] = field(default_factory=list)
    iter_s: float = math.nan  # median wall time of a training iteration
    seconds: float = 0.0
    state_bytes_per_param: float = math.nan
    error: str | None = None


@torch.no_grad()
def evaluate(model: GPT, windows: tuple[Tensor, Tensor], dd: Dist = Dist(), chunk: int = 64) -> float:
    """Mean validation loss over all windows. Each rank takes an equal run of them (the last
    padded with weight-0 repeats, so every rank makes the same forward calls, which FSDP2's
    gathers need); the per-window losses are summed in float64 and all-reduced."""
    x, y = windows
    n = len(x)
    per = -(-n // dd.world)
    index = torch.arange(dd.rank * per, (dd.rank + 1) * per, device=x.device)
    weight = (index < n).double()
    index = index.clamp(max=n - 1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, per, chunk):
        j = index[i : i + chunk]
        per_window = lm_loss(model, x[j], y[j], reduction="none").mean(dim=1)
        total += (per_window.double() * weight[i : i + chunk]).sum()
    return float(dd.sum(total)) / n


def train_one(
    name: str,
    seed: int,
    lr: float,
    cfg: LMConfig,
    corpus: Corpus,
    windows: tuple[Tensor, Tensor],
    progress: Callable = common.quiet_progress,
    dd: Dist = Dist(),
) -> Run:
    """Train a fresh model (initial weights and batch order fixed by ``seed``) with optimizer
    ``name``; under ``dd`` a rank's share of it (the model wrapped, its rows of each batch)."""
    model = make_model(cfg, seed).to(dd.device)
    net = dd.wrap(model)
    opt = make_optimizer(name, model, cfg, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    # After the scheduler, which wraps opt.step to check the order of calls.
    step_fn = torch.compile(opt.step) if cfg.compile and not catalog.is_memory(name) else opt.step
    gen = torch.Generator().manual_seed(seed + 1)
    run = Run(name, seed, lr, "compiled" if cfg.compile else "eager")
    n_params = sum(p.numel() for p in model.parameters())
    iter_times: list[float] = []
    start = time.perf_counter()
    run.steps.append(0)
    run.val_loss.append(evaluate(model, windows, dd))
    run.train_loss.append(math.nan)
    rows = dd.rows(cfg.batch_size)
    since = 0
    bar = progress(range(1, cfg.steps + 1), total=cfg.steps, desc=f"{name} seed {seed}"[:20].ljust(20))
    for step in bar:
        x, y = sample_batch(corpus.train, cfg.batch_size, cfg.context, gen)
        x, y = x[rows].to(dd.device), y[rows].to(dd.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(net, x, y)
        loss.backward()
        step_fn()
        sched.step()
        # The whole batch's mean loss: every rank's slice has the same number of tokens.
        batch_loss = float(dd.sum(loss.detach())) / dd.world
        iter_times.append(time.perf_counter() - t0)
        run.batch_loss.append(batch_loss)
        since += 1
        if not math.isfinite(batch_loss):
            run.error = f"loss became {batch_loss} at step {step}"
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run.steps.append(step)
            run.val_loss.append(evaluate(model, windows, dd))
            run.train_loss.append(statistics.fmean(run.batch_loss[-since:]))
            since = 0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(val=f"{run.val_loss[-1]:.3f}", refresh=False)
    run.seconds = time.perf_counter() - start
    run.iter_s = statistics.median(iter_times)
    run.state_bytes_per_param = state_bytes(opt) / n_params
    return run


def describe(cfg: LMConfig, corpus: Corpus, dd: Dist = Dist()) -> list[str]:
    n_params = sum(p.numel() for p in make_model(cfg, 0).parameters())
    lines = [
        f"lm: {corpus.description}",
        f"model: {n_params / 1e6:.2f}M parameters ({cfg.layers} layers, d_model {cfg.d_model}, {cfg.heads} heads, context "
        f"{cfg.context}, byte vocabulary, tied embeddings); batch {cfg.batch_size} x {cfg.context} = {cfg.tokens_per_step} tokens, "
        f"{cfg.steps} steps = {cfg.steps * cfg.tokens_per_step / 1e6:.2f}M tokens per run; lr warm-up {cfg.warmup_steps} steps, "
        f"cosine to {cfg.min_lr_ratio:g}x; validation on {len(eval_windows(corpus.val, cfg.context, cfg.eval_tokens)[0]) * cfg.context} "
        f"tokens every {cfg.eval_every} steps; {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    ]
    for name, hyper in cfg.hyper.items():
        lines.append(f"--set {name}:{common.format_hyper(hyper)} (with the others: {common.format_hyper(hyper_for(name, cfg, cfg.peak_lr(name)))})")
    if cfg.storage != "fp32":
        lines.append(f"optimizer state stored as {cfg.storage} (state_dtype and buffer_dtype; AdamW/Adam: this package's rules)")
    if dd.mode is not None:
        wrapper = "DistributedDataParallel" if dd.mode == "ddp" else "FSDP2 fully_shard (each block and the root)"
        lines.append(
            f"--{dd.mode}: {dd.world} process(es), {dd.backend} on {dd.device.type}, {wrapper}; each rank trains on "
            f"{cfg.batch_size // dd.world} of the batch's {cfg.batch_size} sequences"
        )
    return lines


def _prepare(cfg: LMConfig, log: Callable[[str], None], dd: Dist = Dist()) -> tuple[Corpus, tuple[Tensor, Tensor]]:
    cfg.check()
    if cfg.batch_size % dd.world:
        raise common.CLIError(f"--batch-size {cfg.batch_size} must be a multiple of the {dd.world} processes of --{dd.mode}")
    common.prepare_out(cfg.out)
    common.pyplot()  # fail before training if plots are impossible
    corpus = load_corpus(cfg.data, cfg.val_fraction)
    check_corpus(corpus, cfg.context)
    for line in describe(cfg, corpus, dd):
        log(line)
    if cfg.compile:
        log("--compile: the memory optimizers step through memopt_func.compiled.compile_optimizer, torch.optim's through torch.compile(opt.step)")
    x, y = eval_windows(corpus.val, cfg.context, cfg.eval_tokens)
    return corpus, (x.to(dd.device), y.to(dd.device))


def _train_guarded(
    name: str, seed: int, lr: float, cfg: LMConfig, corpus: Corpus, windows, progress: Callable, log: Callable, dd: Dist = Dist()
) -> Run:
    try:
        run = train_one(name, seed, lr, cfg, corpus, windows, progress, dd)
    except Exception as e:  # one broken optimizer must not hide the others' results
        if dd.world > 1:
            # The other ranks may be waiting in a collective this rank will never join: stop
            # the whole run (torchrun ends the other ranks) rather than go on out of step.
            raise
        run = Run(name, seed, lr, "compiled" if cfg.compile else "eager", error=f"{type(e).__name__}: {e}")
    result = run.error or f"validation loss {run.val_loss[-1]:.4f}, {cfg.tokens_per_step / run.iter_s:,.0f} tokens/s, {run.seconds:.0f} s"
    log(f"  {name} seed {seed} lr {lr:g}: {result}")
    return run


def _quiet(_: str) -> None:
    pass


def run(cfg: LMConfig, log: Callable[[str], None] = print) -> int:
    """Train every optimizer over every seed, print the table, write the plot and curves; returns
    the exit status. Under ``cfg.parallel``, this process's rank of the run: only rank 0 prints
    and writes."""
    cfg.check()
    with distributed(cfg.parallel) as dd:
        if not dd.main:
            log = _quiet
        if cfg.lr_sweep:
            return run_sweep(cfg, log, dd)
        return _run_table(cfg, log, dd)


def _run_table(cfg: LMConfig, log: Callable[[str], None], dd: Dist) -> int:
    corpus, windows = _prepare(cfg, log, dd)
    progress = common.progress_factory(not (cfg.progress and dd.main))
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    runs = [
        _train_guarded(name, seed, cfg.peak_lr(name), cfg, corpus, windows, progress, log, dd)
        for name in cfg.optimizers
        for seed in seeds
    ]
    status = 1 if any(r.error for r in runs) else 0
    if not dd.main:
        return status
    summaries = [summarize(runs, name) for name in cfg.optimizers]
    rows, base_name, target = result_rows(summaries, cfg)
    log("")
    log(common.format_table(HEADERS, rows))
    spread = f"mean +- std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    log(
        f"val loss: final validation cross-entropy in nats per byte ({spread}); tokens to target: training tokens until the "
        f"mean validation curve reaches {base_name}'s final {target:.4f}; vs baseline: that over {base_name}'s own; "
        "tokens/s: training throughput (median iteration); state B/param: optimizer-state bytes per parameter"
    )
    for r in runs:
        if r.error:
            log(f"! {r.optimizer} seed {r.seed}: {r.error}")
    trained = [s for s in summaries if s.steps]
    paths = ([plot(trained, cfg, target, base_name, corpus)] if trained else []) + write_results(runs, rows, cfg, corpus, target, dd)
    log("wrote " + ", ".join(str(p) for p in paths))
    return status


SWEEP_HEADERS = ["optimizer", "lr", "val loss", "best"]


def run_sweep(cfg: LMConfig, log: Callable[[str], None] = print, dd: Dist = Dist()) -> int:
    """One run (the first seed) per optimizer and learning rate; the best lr per optimizer."""
    corpus, windows = _prepare(cfg, log, dd)
    log(f"--lr-sweep: learning rates {', '.join(f'{lr:g}' for lr in cfg.sweep_lrs)}, seed {cfg.seed}")
    progress = common.progress_factory(not (cfg.progress and dd.main))
    runs = [
        _train_guarded(name, cfg.seed, lr, cfg, corpus, windows, progress, log, dd) for name in cfg.optimizers for lr in cfg.sweep_lrs
    ]
    status = 1 if any(r.error for r in runs) else 0
    if not dd.main:
        return status
    final = {(r.optimizer, r.lr): (r.val_loss[-1] if r.val_loss and not r.error else math.nan) for r in runs}
    best = {}
    for name in cfg.optimizers:
        scores = [(final[(name, lr)], lr) for lr in cfg.sweep_lrs if math.isfinite(final[(name, lr)])]
        best[name] = min(scores)[1] if scores else None
    rows = [[name, lr, f"{final[(name, lr)]:.4f}", "*" if best[name] == lr else ""] for name in cfg.optimizers for lr in cfg.sweep_lrs]
    log("")
    log(common.format_table(SWEEP_HEADERS, rows))
    log("best: " + ", ".join(f"{n}={best[n]:g}" if best[n] is not None else f"{n}=-" for n in cfg.optimizers))
    for r in runs:
        if r.error:
            log(f"! {r.optimizer} lr {r.lr:g}: {r.error}")
    path_csv = common.write_csv(cfg.out / "lr_sweep.csv", SWEEP_HEADERS, rows)
    path_json = cfg.out / "lr_sweep.json"
    path_json.write_text(json.dumps({"config": config_dict(cfg), "corpus": corpus.description, "best": best, "runs": [asdict(r) for r in runs]}, indent=1))
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name in cfg.optimizers:
        ax.plot(cfg.sweep_lrs, [final[(name, lr)] for lr in cfg.sweep_lrs], "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"lr sweep: {cfg.steps} steps, seed {cfg.seed}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    path_png = cfg.out / "lr_sweep.png"
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    log(f"wrote {path_png}, {path_csv}, {path_json}")
    return status

