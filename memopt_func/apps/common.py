"""Pieces every subcommand of ``memopt-func`` shares: argument types, tables, plotting, output."""

from __future__ import annotations

import argparse
import ast
import csv
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import catalog

DEMO_EXTRA = "pip install 'memopt-func[demo]'"


class CLIError(Exception):
    """A problem the user can fix (bad value, missing optional package); printed without a traceback."""


def _parse(text: str, cast, ok, must: str):
    """argparse type helper: cast text, check it, or raise ArgumentTypeError saying what it must be."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {must}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {must}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _parse(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _parse(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _parse(text, float, lambda v: v > 0 and not math.isinf(v), "a finite positive number")


def _count(text: str) -> int:
    """``"1000"``, ``"1e6"``, ``"10k"``, ``"2M"`` -> int."""
    t = text.strip().lower()
    scale = 1
    if t and t[-1] in "kmg":
        scale = {"k": 10**3, "m": 10**6, "g": 10**9}[t[-1]]
        t = t[:-1]
    value = float(t) * scale
    if not math.isfinite(value) or value != int(value):
        raise ValueError(text)
    return int(value)


def sizes(text: str) -> list[int]:
    """Comma-separated positive parameter counts, e.g. ``1e4,1e5,1M``."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = _count(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (1000, 1e6, 10k), got {part!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"parameter counts must be >= 1, got {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one parameter count")
    return out


def optimizer_list(valid: Sequence[str] = catalog.NAMES) -> Callable[[str], list[str]]:
    """argparse type: comma-separated optimizer names from ``valid``."""

    def parse(text: str) -> list[str]:
        try:
            return catalog.parse_names(text, valid)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def lr_overrides(valid: Sequence[str] = catalog.NAMES) -> Callable[[str], dict[str, float]]:
    """argparse type: ``NAME=LR[,NAME=LR...]``, or a bare ``LR`` for every optimizer (key ``"*"``)."""

    def parse(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            name, _, value = part.rpartition("=")
            key = "*"
            if name:
                try:
                    key = catalog.parse_names(name, valid)[0]
                except ValueError as e:
                    raise argparse.ArgumentTypeError(str(e)) from None
            try:
                lr = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected NAME=LR or LR, got {part!r}") from None
            if not (lr > 0) or math.isinf(lr):
                raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {part!r}")
            out[key] = lr
        if not out:
            raise argparse.ArgumentTypeError("expected NAME=LR[,NAME=LR...] or a single LR")
        return out

    return parse


def merge_lr_overrides(groups: Iterable[dict[str, float]] | None) -> dict[str, float]:
    """Several ``--lr`` options, later ones winning."""
    merged: dict[str, float] = {}
    for group in groups or ():
        merged.update(group)
    return merged


def resolve_lr(name: str, default: float, overrides: dict[str, float]) -> float:
    return overrides.get(name, overrides.get("*", default))


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (``betas=(0.9,0.99),eps=1e-6``: two parts)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()]


def _hyper_value(text: str) -> Any:
    """A ``--set`` value: a Python literal (``0.999``, ``(0.9, 0.999)``, ``True``, ``None``,
    ``'nearest'``) or a torch dtype (``torch.bfloat16``); a bare word is taken as a string."""
    import torch

    if text.startswith("torch.") and isinstance(getattr(torch, text[6:], None), torch.dtype):
        return getattr(torch, text[6:])
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.isidentifier():
            return text
        raise argparse.ArgumentTypeError(f"cannot read the value {text!r} (a number, a tuple, True/False/None, a word or torch.<dtype>)") from None


def hyper_overrides(valid: Sequence[str] = catalog.NAMES) -> Callable[[str], dict[str, dict[str, Any]]]:
    """argparse type of ``--set``: ``NAME:KEY=VALUE[,KEY=VALUE...]``, constructor arguments of one
    optimizer (any but ``lr``, which ``--lr`` sets). The names are checked here; the values by the
    optimizer itself (``check_hyper_overrides``)."""

    def parse(text: str) -> dict[str, dict[str, Any]]:
        name, colon, rest = text.partition(":")
        if not colon or not rest.strip():
            raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
        try:
            name = catalog.parse_names(name, valid)[0]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        known = catalog.constructor_names(name)
        out: dict[str, Any] = {}
        for part in _top_level_split(rest):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not value.strip():
                raise argparse.ArgumentTypeError(f"expected KEY=VALUE in --set {name}:..., got {part!r}")
            if key == "lr":
                raise argparse.ArgumentTypeError(f"--set {name}: set the learning rate with --lr {name}=LR")
            beta = _BETA.fullmatch(key)
            if beta and "betas" in known:  # one entry of ``betas``, the others as they are
                if int(beta.group(1)) > len(catalog.defaults(name)["betas"]):
                    raise argparse.ArgumentTypeError(f"--set {name}: {name}'s betas have {len(catalog.defaults(name)['betas'])} entries, no {key}")
            elif key not in known:
                raise argparse.ArgumentTypeError(f"--set {name}: {name} takes no {key!r}; it takes {', '.join(known)}")
            out[key] = _hyper_value(value.strip())
        return {name: out}

    return parse


_BETA = re.compile(r"beta([1-9])")


def with_overrides(name: str, hyper: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``hyper`` with ``--set``'s ``overrides`` for ``name`` applied: ``betaN`` replaces entry N of
    ``betas`` (``hyper``'s, else the optimizer's default), every other key its own value."""
    out = {**hyper, **{k: v for k, v in overrides.items() if not _BETA.fullmatch(k)}}
    for key, value in overrides.items():
        beta = _BETA.fullmatch(key)
        if beta:
            betas = list(out.get("betas", catalog.defaults(name)["betas"]))
            betas[int(beta.group(1)) - 1] = value
            out["betas"] = tuple(betas)
    return out


def merge_hyper_overrides(groups: Iterable[dict[str, dict[str, Any]]] | None) -> dict[str, dict[str, Any]]:
    """Several ``--set`` options, later ones winning key by key."""
    merged: dict[str, dict[str, Any]] = {}
    for group in groups or ():
        for name, hyper in group.items():
            into = merged.setdefault(name, {})
            if "betas" in hyper:  # a later betas replaces every earlier betaN
                for key in [k for k in into if _BETA.fullmatch(k)]:
                    del into[key]
            into.update(hyper)
    return merged


def check_hyper_overrides(
    overrides: dict[str, dict[str, Any]], optimizers: Sequence[str], base: Callable[[str], dict[str, Any]], storage: str = "fp32"
) -> None:
    """CLIError unless each ``--set`` names an optimizer of the run (``optimizers``) that accepts
    its values over ``base(name)`` (its other settings): it is built once over a stand-in
    parameter, so its own checks decide."""
    import torch

    for name, hyper in overrides.items():
        if name not in optimizers:
            raise CLIError(f"--set {name}:{format_hyper(hyper)}: {name} is not among the optimizers of this run ({', '.join(optimizers)})")
        try:
            catalog.make_optimizer(name, [torch.zeros(2, requires_grad=True)], storage=storage, **with_overrides(name, base(name), hyper))
        except (ValueError, TypeError, RuntimeError) as e:
            raise CLIError(f"--set {name}:{format_hyper(hyper)}: {e}") from None


def format_hyper(hyper: dict[str, Any]) -> str:
    """``key=value,...`` as ``--set`` takes them (a dtype as ``torch.<dtype>``)."""
    return ",".join(f"{k}={v}" if type(v).__module__ == "torch" else f"{k}={v!r}" for k, v in hyper.items())


def jsonable(value: Any) -> Any:
    """A ``--set`` value as JSON holds it (tuples as lists, a dtype as its name)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def add_common(
    parser: argparse.ArgumentParser, *, default_out: str, default_optimizers: Sequence[str], valid: Sequence[str], seed: int = 0, seed_help: str = "random seed"
) -> None:
    parser.add_argument(
        "--optimizers",
        type=optimizer_list(valid),
        default=list(default_optimizers),
        metavar="NAMES",
        help=f"comma-separated optimizers to run (default: {','.join(default_optimizers)}; valid: {', '.join(valid)})",
    )
    parser.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR", help=f"output folder for plots and results (default: {default_out})")
    parser.add_argument("--seed", type=nonnegative_int, default=seed, help=f"{seed_help} (default: {seed})")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 10 ** (digits + 1) or abs(value) < 10 ** (-digits + 1)):
            return f"{value:.{max(1, digits - 2)}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else format_value(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def running_mean(values: Sequence[float], width: int) -> list[float]:
    """The mean of each value and the ``width - 1`` before it (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed)."""
    try:
        import matplotlib
    except ImportError:
        raise CLIError(f"plots need matplotlib: {DEMO_EXTRA}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", disable: bool = False):
    """A tqdm progress bar on stderr, redrawn at most twice a second (a log file gets few lines)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise CLIError(f"progress bars need tqdm: {DEMO_EXTRA} (or pass --no-progress)") from None
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(
        iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr,
        mininterval=interval,
    )


def quiet_progress(iterable: Iterable, **_: Any):
    return iterable


def progress_factory(disable: bool):
    return quiet_progress if disable else progress


def prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {str(out)!r}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"output folder {str(out)!r} is not writable")
    return out


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """``path`` as a CSV file: the header line, then one line per row; returns path."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path
