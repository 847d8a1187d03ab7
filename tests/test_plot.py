"""The plot command draws one or several runs' curves into a PNG."""

import json

import pytest

from gtacore.plot import plot_runs

pytest.importorskip("matplotlib")


def test_plot_runs_writes_png(tmp_path):
    for name, slope in (("gta", 0.1), ("grpo", 0.05)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": slope * s, "format_rate": 0.1 * s}) + "\n" for s in range(1, 6)))
        (run / "eval.jsonl").write_text("".join(json.dumps({"step": s, "accuracy": 0.2 + slope * s}) + "\n" for s in (0, 5)))
    out = plot_runs([tmp_path / "gta", tmp_path / "grpo"], tmp_path / "c.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
