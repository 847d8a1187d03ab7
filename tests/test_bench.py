"""The benchmark scripts run (tiny shapes on CPU) and write their CSV, so they cannot rot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bench_vs_trl.py needs TRL and several minutes at its smallest; it is run by hand.
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py") if p.name != "bench_vs_trl.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs(script, tmp_path):
    out = tmp_path / "out.csv"
    timing = [] if script == "bench_memory.py" else ["--warmup", "0", "--reps", "1", "--no-compile"]  # it times nothing
    cmd = [sys.executable, str(ROOT / "bench" / script), *timing, "--csv", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert rows and all(r.get("device") for r in rows)
