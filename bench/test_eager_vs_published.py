"""The eager comparison script runs its cells in fresh processes and reports both sides."""

import json

import eager_vs_published


def test_cells_run_in_fresh_processes_and_report_both_implementations(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert eager_vs_published.main(["--sizes", "3x50", "--rules", "Adam_CM", "--repeats", "1", "--steps", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["size"] == "3x50" and row["rule"] == "Adam_CM" and row["allocator"] == "default"
    assert row["ours_ms"] > 0 and row["published_ms"] > 0
    assert row["published_over_ours"] == row["published_ms"] / row["ours_ms"]
    assert "| default | 3x50 | Adam_CM |" in capsys.readouterr().out
