"""memopt-func: compare memory-augmented optimizers on a small language model, a small MLP, 2-D test functions, and by step time.

  memopt-func lm         train a byte-level GPT on real text with each optimizer (table, tokens-to-target, loss plots)
  memopt-func demo       train a small MLP on two spirals with each optimizer (table + loss plots)
  memopt-func surfaces   the critical-momenta exploration experiment on 2-D test functions
                         (--rosenbrock-toy: the AdEMAMix paper's Rosenbrock toy)
  memopt-func bench      optimizer step time against parameter count, with the byte roofline

Every subcommand runs in minutes on a laptop CPU with its defaults (lm: about 13 minutes on 2 cores,
lm --quick: about 1 minute); see `memopt-func CMD --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import catalog, common
from .surfaces import SURFACES


def _paragraphs(*texts: str) -> str:
    """Help text as wrapped paragraphs (the subparsers keep line breaks as written)."""
    return "\n\n".join(textwrap.fill(t, 79) for t in texts)


def _add_threads(parser: argparse.ArgumentParser, default: int | None) -> None:
    if default is None:
        text = "torch intra-op threads (default: torch's choice)"
    else:
        text = f"torch intra-op threads (default: {default}; the tensors are tiny, so more threads only add wake-up cost)"
    parser.add_argument("--threads", type=common.positive_int, default=default, help=text)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo import DEMO_HYPER, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a small MLP on two spirals with each optimizer and compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Train a 2-H-H-2 tanh MLP on the bundled two-spirals data (generated, no downloads) with each "
            "optimizer from the same initial weights; print final train/validation loss and accuracy, "
            "optimizer-step time and optimizer-state bytes per parameter; write loss-curve plots "
            "(loss_curves.png, state_bytes.png) and results (results.csv, curves.json) into --out."
        ),
        epilog=_paragraphs(
            "default hyperparameters: " + "; ".join(f"{k} " + ", ".join(f"{a}={v:g}" for a, v in h.items()) for k, h in DEMO_HYPER.items()),
            "SGD_C runs without momentum: the sum of its gradient and buffer mean already acts like momentum.",
        ),
    )
    common.add_common(
        p, default_out="memopt_out/demo", default_optimizers=catalog.DEFAULT, valid=catalog.NAMES, seed=d.seed,
        seed_help="seed of the data, the initial weights and the batch order",
    )
    p.add_argument("--steps", type=common.positive_int, default=d.steps, help=f"training steps per optimizer (default: {d.steps})")
    p.add_argument("--batch-size", type=common.positive_int, default=d.batch_size, help=f"mini-batch size (default: {d.batch_size})")
    p.add_argument("--hidden", type=common.positive_int, default=d.hidden, help=f"hidden width of the MLP (default: {d.hidden})")
    p.add_argument("--train-size", type=common.positive_int, default=d.n_train, help=f"training points (default: {d.n_train})")
    p.add_argument("--val-size", type=common.positive_int, default=d.n_val, help=f"validation points (default: {d.n_val})")
    p.add_argument("--eval-every", type=common.positive_int, default=d.eval_every, help=f"steps between full-set evaluations (default: {d.eval_every})")
    p.add_argument(
        "--lr", type=common.lr_overrides(), action="append", metavar="NAME=LR",
        help="override learning rates: NAME=LR[,NAME=LR...], or one LR for all; may be repeated",
    )
    _add_set(p, list(catalog.NAMES))
    p.add_argument("--compiled", action="store_true", help="step the memory optimizers through memopt_func.compiled.compile_optimizer")
    _add_threads(p, 1)
    _add_storage(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run

    if args.train_size < 2 or args.val_size < 2:
        raise common.CLIError("--train-size and --val-size must be at least 2 (one point per spiral arm)")
    cfg = DemoConfig(
        optimizers=args.optimizers, steps=args.steps, batch_size=min(args.batch_size, args.train_size),
        n_train=args.train_size, n_val=args.val_size, hidden=args.hidden, eval_every=args.eval_every,
        seed=args.seed, lr=common.merge_lr_overrides(args.lr), out=args.out, compiled=args.compiled, storage=args.storage,
        hyper=common.merge_hyper_overrides(args.set), progress=not args.no_progress,
    )
    from .demo import demo_hyper

    common.check_hyper_overrides(cfg.hyper, cfg.optimizers, lambda name: {k: v for k, v in demo_hyper(name).items() if k != "lr"}, cfg.storage)
    return run(cfg)


def _sizes_text(name: str) -> str:
    from .lm import PRESETS

    p = PRESETS[name]
    return (
        f"{name}: {p.layers} layers, d_model {p.d_model}, {p.heads} heads, context {p.context}, batch {p.batch_size}, "
        f"{p.steps} steps, {p.seeds} seed(s), eval every {p.eval_every} steps on {p.eval_tokens} tokens; lr "
        + ", ".join(f"{k} {v:g}" for k, v in p.lr.items())
    )


def _add_set(p: argparse.ArgumentParser, valid: list[str]) -> None:
    p.add_argument(
        "--set", type=common.hyper_overrides(valid), action="append", metavar="NAME:KEY=VALUE,...",
        help="any constructor argument of one optimizer but lr, e.g. AdEMAMix:betas=(0.9,0.999,0.999),alpha=8 or "
        "AdEMAMix:beta3=0.999 (one entry of betas) or Adam_CM:topC=10,decay=0.99; values are Python literals or "
        "torch.<dtype>, checked by the optimizer itself; may be repeated (later values win)",
    )


def _add_lm(sub: argparse._SubParsersAction) -> None:
    from .lm import LM_HYPER, OPTIMIZERS, SWEEP_LRS, LMConfig

    d = LMConfig()
    valid = list(LM_HYPER)
    p = sub.add_parser(
        "lm",
        help="train a small byte-level GPT on real text with each optimizer and compare",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Train a GPT-style decoder (pre-norm, causal scaled_dot_product_attention, tied embeddings) byte-level on "
            "the Python standard library's own source files (found through sysconfig; no downloads; split into train "
            "and validation by file with a fixed seed), or on --data, with each optimizer from the same initial "
            "weights and batches, under one warm-up + cosine schedule, each at its own learning rate. Prints the "
            "final validation loss (mean +- std over seeds), tokens-to-target (training tokens until the mean "
            "validation curve reaches AdamW's final loss), tokens per second and optimizer-state bytes per "
            "parameter; writes loss_curves.png, curves.csv, results.csv and curves.json into --out.",
            "--lr-sweep trains one seed per optimizer and learning rate instead and reports the best learning "
            "rate of each (lr_sweep.png, lr_sweep.csv, lr_sweep.json).",
        ),
        epilog=_paragraphs(
            "presets (flags override them): " + "; ".join(_sizes_text(n) for n in ("default", "quick")),
            "other hyperparameters: " + "; ".join(f"{k} " + ", ".join(f"{a}={v}" for a, v in h.items()) for k, h in LM_HYPER.items())
            + "; AdEMAMix warms alpha and beta3 up over the whole run.",
        ),
    )
    common.add_common(
        p, default_out="memopt_out/lm", default_optimizers=OPTIMIZERS, valid=valid, seed=d.seed,
        seed_help="first seed of the initial weights and the batch order (the train/validation split has its own, fixed)",
    )
    p.add_argument("--quick", action="store_const", const="quick", default="default", dest="preset", help="the quick preset (make demo): a smaller model, fewer steps, one seed")
    p.add_argument("--data", type=Path, metavar="PATH", help="a text file or a folder of text files instead of the standard library's sources")
    p.add_argument("--steps", type=common.positive_int, help="training steps per run")
    p.add_argument("--batch-size", type=common.positive_int, help="sequences per batch")
    p.add_argument("--context", type=common.positive_int, help="sequence length in bytes")
    p.add_argument("--d-model", type=common.positive_int, help="model width")
    p.add_argument("--layers", type=common.positive_int, help="transformer blocks")
    p.add_argument("--heads", type=common.positive_int, help="attention heads (must divide --d-model)")
    p.add_argument("--seeds", type=common.positive_int, help="seeds per optimizer: --seed, --seed + 1, ...")
    p.add_argument("--eval-every", type=common.positive_int, help="steps between validation evaluations")
    p.add_argument("--eval-tokens", type=common.positive_int, help="validation tokens per evaluation (evenly spaced windows)")
    p.add_argument(
        "--lr", type=common.lr_overrides(valid), action="append", metavar="NAME=LR",
        help="override peak learning rates: NAME=LR[,NAME=LR...], or one LR for all; may be repeated",
    )
    _add_set(p, valid)
    p.add_argument("--lr-sweep", action="store_true", help="sweep the learning rate of each optimizer (one seed) instead")
    p.add_argument(
        "--sweep-lrs", type=_lr_list, default=list(SWEEP_LRS), metavar="LR,LR,...",
        help=f"learning rates of --lr-sweep (default: {','.join(f'{x:g}' for x in SWEEP_LRS)})",
    )
    p.add_argument(
        "--compile", "--compiled", action="store_true", dest="compile",
        help="step through memopt_func.compiled.compile_optimizer (torch.optim baselines: torch.compile(opt.step))",
    )
    p.add_argument(
        "--threads", type=common.positive_int, default=1,
        help="torch intra-op threads (default: 1, steady when other work shares the cores; more help on an idle machine)",
    )
    parallel = p.add_mutually_exclusive_group()
    parallel.add_argument(
        "--ddp", action="store_const", const="ddp", dest="parallel",
        help="data-parallel under torchrun (torchrun --nproc-per-node N -m memopt_func lm --ddp): DistributedDataParallel, "
        "each rank trains on its 1/N of every batch (gloo on CPU, nccl on cuda:LOCAL_RANK); without torchrun, a world of one process",
    )
    parallel.add_argument(
        "--fsdp", action="store_const", const="fsdp", dest="parallel",
        help="as --ddp, with the model sharded by FSDP2 (torch.distributed.fsdp.fully_shard on each block and the root) "
        "instead of replicated; not with --compile",
    )
    _add_storage(p)
    p.set_defaults(func=_run_lm)


def _lr_list(text: str) -> list[float]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if part:
            out.append(common.positive_float(part))
    if not out:
        raise argparse.ArgumentTypeError("expected comma-separated learning rates")
    return out


def _run_lm(args: argparse.Namespace) -> int:
    from .lm import LMConfig, run

    sizes = ("steps", "batch_size", "context", "d_model", "layers", "heads", "seeds", "eval_every", "eval_tokens")
    overrides = {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    cfg = LMConfig.from_preset(
        args.preset, optimizers=args.optimizers, seed=args.seed, data=args.data, lr=common.merge_lr_overrides(args.lr),
        lr_sweep=args.lr_sweep, sweep_lrs=args.sweep_lrs, compile=args.compile, parallel=args.parallel, out=args.out,
        storage=args.storage, hyper=common.merge_hyper_overrides(args.set),
        progress=not args.no_progress,
        **overrides,
    )
    from .lm import LM_HYPER, hyper_for

    common.check_hyper_overrides(cfg.hyper, cfg.optimizers, lambda name: {k: v for k, v in hyper_for(name, cfg, 1e-3).items() if k != "lr"} if name in LM_HYPER else {}, cfg.storage)
    return run(cfg)


def _function_list(text: str) -> list[str]:
    try:
        return catalog.parse_names(text, list(SURFACES))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("optimizer", "function")) from None


def _add_surfaces(sub: argparse._SubParsersAction) -> None:
    from .surfaces import RosenbrockToyConfig, SurfacesConfig

    c = SurfacesConfig()
    t = RosenbrockToyConfig()
    p = sub.add_parser(
        "surfaces",
        help="exploration experiment on 2-D test functions (share of runs reaching the global basin); "
        "--rosenbrock-toy: the AdEMAMix paper's Rosenbrock toy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "The critical-momenta paper's exploration experiment: from many random starts (the same for every "
            "optimizer), run each optimizer on 2-D test functions and report the share of runs ending in the "
            "global minimum's basin (within a per-function radius of a global minimiser) and the final-loss "
            "distribution; write trajectory plots over the contours (trajectories_<function>.png), summary.png "
            "and results into --out. Each start is an independent run of the functional rule (per-start "
            "critical buffers, synced=False)."
        ),
        epilog="functions: starts drawn in box x, y; global basin radius r; lr of the adaptive / SGD-type rules\n"
        + "\n".join(
            f"  {s.name:<16} x {s.bounds[0]}, y {s.bounds[1]}; r {s.radius}; lr {s.lr:g} / {s.sgd_lr:g}" for s in SURFACES.values()
        ),
    )
    valid = list(catalog.NAMES)
    common.add_common(
        p, default_out="memopt_out/surfaces", default_optimizers=catalog.DEFAULT, valid=valid, seed=c.seed,
        seed_help="seed of the random starts",
    )
    p.add_argument("--functions", type=_function_list, default=c.functions, metavar="NAMES", help=f"comma-separated test functions (default: all: {','.join(SURFACES)})")
    p.add_argument("--starts", type=common.positive_int, default=c.starts, help=f"random starts per optimizer and function (default: {c.starts})")
    p.add_argument("--steps", type=common.positive_int, help=f"optimizer steps per run (default: {c.steps}; --rosenbrock-toy: {t.steps})")
    p.add_argument("--shown", type=common.positive_int, default=c.shown, help=f"trajectories drawn per panel (default: {c.shown})")
    p.add_argument(
        "--lr", type=common.lr_overrides(valid), action="append", metavar="NAME=LR",
        help="override learning rates (all functions): NAME=LR[,NAME=LR...], or one LR for all; may be repeated",
    )
    p.add_argument(
        "--rosenbrock-toy", action="store_true",
        help=f"run the AdEMAMix paper's Rosenbrock toy instead: from {t.start}, lr {t.lr:g}, Adam with beta1 in "
        f"{{{', '.join(f'{b:g}' for b in t.adam_beta1)}}} against AdEMAMix (beta1 0) with beta3 in "
        f"{{{', '.join(f'{b:g}' for b in t.ademamix_beta3)}}}; trajectories and distance to the minimum "
        "(--functions, --optimizers, --starts and --lr do not apply)",
    )
    p.add_argument("--toy-alpha", type=common.positive_float, default=t.alpha, help=f"AdEMAMix's alpha in --rosenbrock-toy, warmed up over the run (default: {t.alpha:g})")
    _add_threads(p, 1)
    p.set_defaults(func=_run_surfaces)


def _run_surfaces(args: argparse.Namespace) -> int:
    from .surfaces import RosenbrockToyConfig, SurfacesConfig, run, run_toy

    if args.rosenbrock_toy:
        toy = RosenbrockToyConfig(alpha=args.toy_alpha, out=args.out, progress=not args.no_progress)
        if args.steps is not None:
            toy.steps = args.steps
        return run_toy(toy)
    cfg = SurfacesConfig(
        functions=args.functions, optimizers=args.optimizers, starts=args.starts, steps=args.steps or SurfacesConfig.steps, seed=args.seed,
        lr=common.merge_lr_overrides(args.lr), shown=args.shown, out=args.out, progress=not args.no_progress,
    )
    return run(cfg)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench_report import BenchConfig

    b = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="optimizer step time against parameter count, with the byte roofline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Time optimizer.step() (fixed random gradients, float32) for each optimizer at several parameter "
            "counts: this package's drop-ins eagerly (and through memopt_func.compiled.compile_optimizer with --compiled) "
            "against torch.optim.Adam/AdamW (foreach). The roofline is the bytes a step must move (params read "
            "and written, grads read, each per-parameter state tensor read and written, over the copy "
            "bandwidth measured in the same run. Writes step_time.png, results.csv and results.json into --out.",
            "A critical buffer counts as the one slot a step writes: its other topC - 1 slots are not touched.",
        ),
    )
    common.add_common(
        p, default_out="memopt_out/bench", default_optimizers=catalog.DEFAULT, valid=catalog.NAMES, seed=b.seed,
        seed_help="seed of the parameters and gradients",
    )
    p.add_argument("--sizes", type=common.sizes, default=b.sizes, metavar="N,N,...", help="parameter counts, e.g. 1e4,1e5,1M (default: 1e4,1e5,1e6)")
    p.add_argument("--tensors", type=common.positive_int, default=b.tensors, help=f"tensors the parameters are split into (default: {b.tensors})")
    p.add_argument("--warmup", type=common.nonnegative_int, default=b.warmup, help=f"untimed steps first; at least 1 is always run (default: {b.warmup})")
    p.add_argument("--repeats", type=common.positive_int, default=b.repeats, help=f"timed steps per cell, at most (default: {b.repeats})")
    p.add_argument("--budget", type=common.positive_float, default=b.budget_s, metavar="SECONDS", help=f"stop timing a cell after this many seconds (at least 3 steps; default: {b.budget_s})")
    p.add_argument("--rounds", type=common.positive_int, default=b.rounds, help=f"passes over all cells; each cell keeps its fastest pass (default: {b.rounds})")
    p.add_argument("--copy-mb", type=common.positive_int, default=b.copy_mb, help=f"MiB copied to measure the bandwidth (default: {b.copy_mb})")
    p.add_argument("--device", default=b.device, help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--compiled", action="store_true", help="also time the drop-ins through memopt_func.compiled.compile_optimizer (compiles once per cell)")
    _add_threads(p, None)
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench_report import BenchConfig, run

    cfg = BenchConfig(
        optimizers=args.optimizers, sizes=args.sizes, tensors=args.tensors, warmup=args.warmup, repeats=args.repeats,
        budget_s=args.budget, rounds=args.rounds, copy_mb=args.copy_mb, compiled=args.compiled, device=args.device, seed=args.seed,
        out=args.out, progress=not args.no_progress,
    )
    return run(cfg)


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage", "--state-dtype", dest="storage", choices=list(catalog.STORAGE), default="fp32",
        help="optimizer state storage: fp32 (default), bf16 or int8 (state_dtype and buffer_dtype; stochastic "
        "rounding); AdamW/Adam then run as this package's rules of that name",
    )


def _add_memory(sub: argparse._SubParsersAction) -> None:
    from .memory import OPTIMIZERS, SETTINGS, MemoryConfig

    m = MemoryConfig()
    p = sub.add_parser(
        "memory",
        help="optimizer state bytes per parameter for each storage setting, measured from state_dict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
            "Step each optimizer once on an MLP of 300k float32 parameters with each storage setting (fp32: "
            "today's state; bf16: state_dtype and buffer_dtype torch.bfloat16; int8: both torch.int8) and sum the "
            "bytes of the tensors in optimizer.state_dict()['state']. Prints bytes per parameter and the total for "
            "--params parameters, beside other libraries' published figures; writes memory.csv, memory.json and "
            "memory.png into --out.",
        ),
    )
    p.add_argument(
        "--optimizers", type=common.optimizer_list(OPTIMIZERS), default=list(OPTIMIZERS), metavar="NAME,...",
        help=f"optimizers, of {', '.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument(
        "--storage", type=_storage_list, default=list(SETTINGS), metavar="NAME,...",
        help=f"storage settings, of {', '.join(SETTINGS)} (default: all)",
    )
    p.add_argument("--params", type=common.positive_float, default=m.params, help="model size for the totals (default: 7e9)")
    p.add_argument("--out", type=Path, default=m.out, help=f"output folder (default: {m.out})")
    p.add_argument("--no-plot", action="store_true", help="write no memory.png (no matplotlib needed)")
    _add_threads(p, None)
    p.set_defaults(func=_run_memory)


def _storage_list(text: str) -> list[str]:
    from .memory import SETTINGS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SETTINGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"invalid storage {text!r}: choose from {', '.join(SETTINGS)}")
    return names


def _run_memory(args: argparse.Namespace) -> int:
    from .memory import MemoryConfig, run

    cfg = MemoryConfig(optimizers=args.optimizers, settings=args.storage, params=args.params, out=args.out, plot=not args.no_plot)
    return run(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt-func", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{lm,demo,surfaces,bench,memory}")
    _add_lm(sub)
    _add_demo(sub)
    _add_surfaces(sub)
    _add_bench(sub)
    _add_memory(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        status = args.func(args)
    except common.CLIError as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(f"{args.command} finished in {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
