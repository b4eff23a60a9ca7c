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

import csv
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compiled import compile_optimizer
from . import catalog, common
from .benchmarking import state_bytes

VOCAB = 256
BASELINE = "AdamW"
OPTIMIZERS = ("AdamW", "AdEMAMix", "Adam", "Adam_CM", "Adam_C")
SPLIT_SEED = 0  # the train/validation split of files never depends on --seed
# Every collective waits at most this long, so a rank that died or hung fails the others.
DIST_TIMEOUT_S = 120

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


# --- data ------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Byte streams for training and validation, and where they came from."""

    name: str  # what the text is, in a few words
    description: str  # name, where, and the sizes of the split
    train: Tensor  # uint8
    val: Tensor  # uint8
    train_files: list[str]
    val_files: list[str]

    @property
    def size(self) -> int:
        return self.train.numel() + self.val.numel()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by path (installed packages left out)."""
    root = stdlib_root() if root is None else root
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not skip.intersection(p.relative_to(root).parts))


def _read_text(path: Path) -> bytes | None:
    """The file's bytes if it is UTF-8 text without NUL bytes, else None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def split_files(files: Sequence[str], val_fraction: float, seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(train, validation): the sorted names shuffled with ``seed``, the first share to validation;
    each part sorted again. At least one file goes to each side when there are two or more."""
    names = sorted(files)
    order = list(names)
    random.Random(seed).shuffle(order)
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = set(order[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


def _stream(chunks: Sequence[bytes]) -> Tensor:
    joined = b"".join(chunks)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def load_corpus(data: Path | None = None, val_fraction: float = 0.05) -> Corpus:
    """The standard library's sources (``data`` None), or every text file under ``data``."""
    if data is None:
        root = stdlib_root()
        paths = stdlib_files(root)
        name = f"Python {sys.version.split()[0]} standard library"
        what = f"{name} ({root})"
    else:
        if not data.exists():
            raise common.CLIError(f"--data {str(data)!r}: no such file or folder")
        root = data if data.is_dir() else data.parent
        if data.is_dir():
            paths = sorted(p for p in data.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(data).parts))
        else:
            paths = [data]
        name = what = str(data)
    texts = {}
    for p in paths:
        text = _read_text(p)
        if text:
            texts[p.relative_to(root).as_posix()] = text
    if not texts:
        looked = f"{len(paths)} file(s)" if paths else "no files"
        where = f"--data {str(data)!r}" if data is not None else f"the standard library at {str(root)!r} (pass --data PATH)"
        raise common.CLIError(f"{where}: no text found ({looked}; text means UTF-8 without NUL bytes)")
    if len(texts) == 1:
        ((fname, text),) = texts.items()
        cut = len(text) - max(1, round(val_fraction * len(text)))
        corpus = Corpus(name, f"{what}: 1 file, {_mb(len(text))}", _stream([text[:cut]]), _stream([text[cut:]]), [fname], [fname])
        corpus.description += f"; split by position: the last {100 * val_fraction:g}% for validation"
        return corpus
    train, val = split_files(list(texts), val_fraction)
    corpus = Corpus(name, what, _stream([texts[n] for n in train]), _stream([texts[n] for n in val]), train, val)
    corpus.description = (
        f"{what}: {len(texts)} files, {_mb(corpus.size)}; train {len(train)} files {_mb(corpus.train.numel())}, "
        f"validation {len(val)} files {_mb(corpus.val.numel())} (split by file, seed {SPLIT_SEED})"
    )
    return corpus


def check_corpus(corpus: Corpus, context: int) -> None:
    for part, stream in (("training", corpus.train), ("validation", corpus.val)):
        if stream.numel() < context + 2:
            raise common.CLIError(
                f"the {part} text has {stream.numel()} bytes, fewer than --context {context} + 2; give more text or a shorter --context"
            )


def sample_batch(stream: Tensor, batch: int, context: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``context + 1`` bytes: (inputs, next-byte targets), int64."""
    starts = torch.randint(0, stream.numel() - context, (batch,), generator=gen)
    window = stream[starts[:, None] + torch.arange(context + 1)].long()
    return window[:, :-1], window[:, 1:]


def eval_windows(stream: Tensor, context: int, tokens: int) -> tuple[Tensor, Tensor]:
    """Evenly spaced windows over the whole validation stream (the same for every run)."""
    n = max(1, min(tokens // context, stream.numel() - context))
    starts = torch.linspace(0, stream.numel() - context - 1, n).long()
    window = stream[starts[:, None] + torch.arange(context + 1)].long()
    return window[:, :-1], window[:, 1:]


# --- model -----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A byte-level decoder; the output layer is the byte embedding, transposed."""

    def __init__(self, context: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's initialisation: residual projections shrink with depth, so the residual
                # stream's scale does not grow with it; logits start near 0 (loss ln 256).
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        return lm_loss(self, idx, targets)


def lm_loss(net: nn.Module, idx: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-byte cross-entropy of ``net`` (a GPT, or a wrapper whose forward is the GPT's):
    the mean over all tokens, or per token ``[batch, context]`` with ``reduction="none"``."""
    loss = F.cross_entropy(net(idx).reshape(-1, VOCAB), targets.reshape(-1), reduction=reduction)
    return loss if reduction == "mean" else loss.view(targets.shape)


def make_model(cfg: LMConfig, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg.context, cfg.d_model, cfg.layers, cfg.heads)


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
    hyper = {**LM_HYPER[name], "lr": lr}
    if name == "AdEMAMix":
        hyper.update(beta3_warmup=cfg.steps, alpha_warmup=cfg.steps)
    return hyper


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


# --- distributed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's part of a run: the whole of it (``mode`` None), or one rank of a process
    group that wraps the model for ``mode`` ("ddp" or "fsdp")."""

    mode: str | None = None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    mesh: Any = None  # FSDP2's one-dimensional device mesh over every rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's sequences of a global batch (``batch`` is a multiple of ``world``)."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training loop calls forward on: the model itself (one process; FSDP2, which
        shards the model in place), or a ``DistributedDataParallel`` around it."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return model

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (every rank gets the same result)."""
        if self.mode is not None:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


@contextmanager
def distributed(mode: str | None) -> Iterator[Dist]:
    """The process group of a ``--ddp`` / ``--fsdp`` run, destroyed on the way out (on errors too).

    Under ``torchrun`` the rank, world size and local rank come from its environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, rendezvous at ``MASTER_ADDR:MASTER_PORT``). Without it
    (``WORLD_SIZE`` unset) the run is a world of one process, grouped through a file store in a
    temporary folder: the wrapped model and every collective, over one rank. The backend is nccl
    on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU."""
    if mode is None:
        yield Dist()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise common.CLIError(f"--{mode} needs torch.distributed, which this torch build lacks")
    env = os.environ
    if "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise common.CLIError(f"--{mode}: WORLD_SIZE is set but {', '.join(missing)} not; start the command with torchrun")
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="memopt-lm-") as folder:
        if "WORLD_SIZE" in env:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        else:
            store = dist.FileStore(os.path.join(folder, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        try:
            mesh = None
            if mode == "fsdp":
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh(device.type, (world,))
            yield Dist(mode, rank, world, device, backend, mesh)
        finally:
            dist.destroy_process_group()


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


# --- results ---------------------------------------------------------------------------------


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


def _config_dict(cfg: LMConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def write_results(runs: list[Run], rows: list[list[Any]], cfg: LMConfig, corpus: Corpus, target: float, dd: Dist = Dist()) -> list[Path]:
    curves_csv = cfg.out / "curves.csv"
    with curves_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "seed", "lr", "step", "tokens", "val_loss", "train_loss"])
        for r in runs:
            for step, val, train in zip(r.steps, r.val_loss, r.train_loss):
                w.writerow([r.optimizer, r.seed, r.lr, step, step * cfg.tokens_per_step, val, "" if math.isnan(train) else train])
    results_csv = cfg.out / "results.csv"
    with results_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADERS)
        w.writerows(rows)
    json_path = cfg.out / "curves.json"
    json_path.write_text(
        json.dumps(
            {
                "config": _config_dict(cfg),
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
    path_csv = cfg.out / "lr_sweep.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SWEEP_HEADERS)
        w.writerows(rows)
    path_json = cfg.out / "lr_sweep.json"
    path_json.write_text(json.dumps({"config": _config_dict(cfg), "corpus": corpus.description, "best": best, "runs": [asdict(r) for r in runs]}, indent=1))
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

