"""bench/cells.py: a cell is a module-level function called in a fresh process."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cells import CellFailed, run_cell  # noqa: E402


def echo(a: int, b: list, *, c: str = "") -> dict:
    """A cell: what it was called with, where, and what its environment says."""
    return {"args": [a, b], "c": c, "pid": os.getpid(), "cwd": os.getcwd(), "env": os.environ.get("CELL_TEST", ""),
            "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")}


def fail(message: str) -> None:
    raise ValueError(message)


def test_a_cell_runs_in_a_fresh_process_with_its_arguments_and_env():
    out = run_cell(echo, 1, [2, "x"], c="y", env={"CELL_TEST": "set"}, empty_inductor_cache=True)
    assert out["args"] == [1, [2, "x"]] and out["c"] == "y" and out["env"] == "set"
    assert out["pid"] != os.getpid() and out["cwd"] == os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert out["cache"] and not os.path.exists(out["cache"])  # a fresh cache, removed afterwards


def test_a_failing_cell_raises_with_its_stderr():
    with pytest.raises(CellFailed) as info:
        run_cell(fail, "no good")
    assert info.value.last_line() == "ValueError: no good"


def test_a_nested_function_is_refused():
    def inner() -> None:
        pass

    with pytest.raises(ValueError, match="module-level"):
        run_cell(inner)
