"""``memopt-func lm``'s data: a byte-level corpus (the Python standard library's own ``.py`` files
by default, or any text file or folder), split into train and validation by file, and the
batches and validation windows drawn from it."""

from __future__ import annotations

import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from . import common

SPLIT_SEED = 0  # the train/validation split of files never depends on --seed


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
