"""The benchmark scripts run (tiny shapes on CPU) and write their CSV, so they cannot rot."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_fixtures import write_dataset, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# bench_vs_trl.py drives train.py and TRL in their own processes: test_bench_vs_trl_smoke.
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py") if p.name != "bench_vs_trl.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs(script, tmp_path):
    out = tmp_path / "out.csv"
    untimed = ("bench_memory.py", "bench_decode.py", "bench_step.py")  # nothing to time, or whole generations (3 each)
    timing = [] if script in untimed else ["--warmup", "0", "--reps", "1", "--no-compile"]
    cmd = [sys.executable, str(ROOT / "bench" / script), *timing, "--csv", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r.get("device") for r in rows)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The prepared GPU check runs every part at tiny shapes on CPU and leaves two files."""
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    status_table = summary.split("\n## ")[0]  # the CSV tables follow under their own headings
    parts = [line for line in status_table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(parts) == 5 and all("| ok |" in line for line in parts), summary[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "summary.md"]


@pytest.mark.slow
def test_bench_vs_trl_smoke(tmp_path):
    """The side-by-side with TRL at tiny sizes: our grpo and gta runs (and TRL's, where installed)
    go through the flags the script passes, and the table comes out."""
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_dataset(tmp_path / "data.jsonl", 12)
    systems = "trl,grpo,gta" if importlib.util.find_spec("trl") else "grpo,gta"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_vs_trl.py"), "--systems", systems, "--steps", "2",
           "--warmup-steps", "1", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8",
           "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rows = {r["system"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert {"ours-grpo", "ours-gta", "ours-gta / ours-grpo"} <= set(rows), rows
    assert float(rows["ours-gta"]["total"]) > 0
