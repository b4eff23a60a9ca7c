"""bench/peers.py's code path at a tiny size (no timing is asserted)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import peers  # noqa: E402


def test_an_eager_cell_runs_in_a_fresh_process_and_reports_a_time():
    cell = peers.run_peer("optim.AdEMAMix, eager", 2, 100, steps=2)
    assert cell["ms"] > 0 and cell["first_s"] > 0
    assert cell["iter_ms"] >= cell["ms"]  # the iteration includes the step


def test_a_missing_package_is_reported_in_the_table_not_dropped(monkeypatch):
    monkeypatch.setitem(peers.CANDIDATES, "absent peer", ("no_such_package_here.Optimizer", {}, False))
    cell = peers.run_peer("absent peer", 2, 100, steps=2)
    assert "not installed" in cell["missing"]
    table = {
        peers.BASELINE: {"2x100": {"ms": 2.0, "iter_ms": 5.0, "first_s": 1.0}},
        "absent peer": {"2x100": cell},
        "older result": {"2x100": {"ms": 3.0, "first_s": 1.5}},  # from before the iteration column
    }
    info = {"torch": "x", "python": "3", "cpu": "cpu", "threads": 2, "versions": {}, "when": "now"}
    text = peers.markdown(info, table, ["2x100"])
    assert "| absent peer | no_such_package_here is not installed (pip install -e '.[bench]') | - | - |" in text
    assert f"| {peers.BASELINE} | 2.00 (1.00) | 5.00 (1.00) | 1.0 |" in text
    assert "| older result | 3.00 (1.50) | - | 1.5 |" in text


def test_a_cell_compiled_with_options_passes_them_to_torch_compile(monkeypatch):
    """A row whose third entry is torch.compile's keyword arguments compiles with them
    (here an option Inductor rejects, which the cell must report, proving it was passed)."""
    monkeypatch.setitem(
        peers.CANDIDATES, "bad options", ("torch.optim.SGD", {"lr": 1e-3}, {"options": {"no_such_option": 1}})
    )
    assert "no_such_option" in peers.run_peer("bad options", 2, 100, steps=2)["error"]
    name = "torch.optim.AdamW, torch.compile(opt.step, options=cpu_codegen)"
    assert peers.CANDIDATES[name][2] == peers.CODEGEN
    cell = peers.run_peer(name, 2, 100, steps=2)
    assert cell["ms"] > 0 and cell["iter_ms"] >= cell["ms"]
