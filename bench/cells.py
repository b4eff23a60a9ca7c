"""One benchmark cell in a fresh Python process: ``run_cell(func, *args)`` imports ``func``'s
module (a module of bench/) in a new interpreter, calls ``func`` with the JSON-serialisable
arguments and returns its JSON-serialisable result. A cell that fails raises ``CellFailed``, with
its stderr.

The child runs this file: ``python bench/cells.py MODULE FUNCTION``, the arguments as JSON on
stdin, the result printed as JSON on the last line of stdout (whatever the cell prints comes
before it)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


class CellFailed(RuntimeError):
    """A cell's process exited with an error; ``stderr`` is what it wrote there."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"benchmark cell failed (exit {returncode}):\n{stderr[-3000:]}")
        self.returncode, self.stderr = returncode, stderr

    def last_line(self) -> str:
        """The last line of its stderr (the exception's message, for a Python error)."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {self.returncode}"


def _module_name(func: Callable[..., Any]) -> str:
    """The name ``func``'s module is imported by in the child (a script run as ``__main__`` is
    imported by its file name, bench/ being on the child's path)."""
    if func.__qualname__ != func.__name__:
        raise ValueError(f"a cell must be a module-level function, not {func.__qualname__}")
    if func.__module__ != "__main__":
        return func.__module__
    path = os.path.abspath(inspect.getfile(func))
    if os.path.dirname(path) != BENCH:
        raise ValueError(f"a cell run from a script must live in bench/, not {path}")
    return os.path.splitext(os.path.basename(path))[0]


def run_cell(
    func: Callable[..., Any], *args: Any, env: dict[str, str] | None = None, empty_inductor_cache: bool = False,
    **kwargs: Any,
) -> Any:
    """Call ``func(*args, **kwargs)`` in a fresh Python process and return its result.

    The process runs in the checkout with the checkout and bench/ on ``PYTHONPATH``, ``env`` added
    to its environment and, with ``empty_inductor_cache``, in fresh Inductor and Triton caches."""
    call = json.dumps({"args": args, "kwargs": kwargs})
    with tempfile.TemporaryDirectory() as cache:
        extra = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache} if empty_inductor_cache else {}
        out = subprocess.run(
            [sys.executable, os.path.join(BENCH, "cells.py"), _module_name(func), func.__name__],
            input=call, capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, BENCH]), **extra, **(env or {})},
        )
    if out.returncode != 0:
        raise CellFailed(out.returncode, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def resolve(path: str) -> Any:
    """The object a dotted path names (``"torch.optim.AdamW"``): how a cell's JSON arguments name
    a class or function."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _child(module: str, name: str) -> None:
    call = json.loads(sys.stdin.read())
    result = getattr(importlib.import_module(module), name)(*call["args"], **call["kwargs"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(*sys.argv[1:])
