"""Shared helpers for the kernel benchmarks: arguments, timing, bandwidth, table and CSV.

Import this before `kernels`: without CUDA it selects Triton's CPU interpreter, in which the
benchmarks run tiny shapes only, so that they keep working on machines without a GPU.
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/x.py` from a checkout, installed or not


def parse_args(description: str, grid: dict, tiny_grid: dict) -> argparse.Namespace:
    """Common flags; args.grid is the shape grid: `grid` on CUDA, `tiny_grid` otherwise, or --N/--V/--D."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"tiny shapes {tiny_grid} (the default without CUDA)")
    for letter in grid:
        parser.add_argument(f"--{letter}", type=int, nargs="+", help=f"{letter} values (default {grid[letter]})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; tiny 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 50; tiny 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--csv", type=Path, default=None, help="CSV path (default runs/bench/<script>.csv)")
    args = parser.parse_args()
    args.tiny = args.tiny or not torch.cuda.is_available()
    args.grid = {k: getattr(args, k) or (tiny_grid if args.tiny else grid)[k] for k in grid}
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.reps = args.reps if args.reps is not None else (3 if args.tiny else 50)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.csv = args.csv or REPO / "runs" / "bench" / f"{Path(sys.argv[0]).stem}.csv"
    return args


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median milliseconds per call, peak memory in MiB while calling fn)."""
    for _ in range(warmup):
        fn()
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return statistics.median(times), peak


def measured_bandwidth_gbs(device: str) -> float:
    """Device memory bandwidth from a large copy (bytes read + written per second)."""
    numel = (1 << 28) if device == "cuda" else (1 << 22)  # 1 GiB / 16 MiB of fp32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def measured_matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """Dense matmul throughput in the benchmark dtype, the ceiling for the LM-head matmuls."""
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device).to(dtype)
    ms, _ = time_ms(lambda: a @ a, warmup=3, reps=10)
    return 2 * n**3 / ms / 1e9


def try_liger(import_path: str, name: str):
    """An object from liger-kernel, or None when it is not installed (or needs CUDA)."""
    try:
        module = __import__(import_path, fromlist=[name])
        return getattr(module, name)
    except Exception:  # ImportError, or a Triton/CUDA error at import on a CPU machine
        return None


def out_of_memory(needed_bytes: int, device: str) -> bool:
    """Skip a shape whose inputs alone would not fit."""
    return device == "cuda" and needed_bytes > 0.8 * torch.cuda.get_device_properties(0).total_memory


def run_case(rows: list[dict], case: dict, method: str, fn, args, work: float, unit_scale: float):
    """Time one method on one shape; append a row with ms, throughput and its fraction of peak."""
    try:
        ms, peak = time_ms(fn, args.warmup, args.reps)
    except torch.cuda.OutOfMemoryError:
        rows.append({**case, "method": method, "ms": "oom"})
        torch.cuda.empty_cache()
        return
    except Exception as error:  # e.g. an installed Liger whose API differs: report it, keep going
        print(f"{method} {case}: {type(error).__name__}: {error}", file=sys.stderr)
        rows.append({**case, "method": method, "ms": f"error: {type(error).__name__}"})
        return
    rate = work / ms / 1e6  # work per ms -> GB/s (bytes) or GFLOP/s (flops) before unit_scale
    rate *= unit_scale
    rows.append({**case, "method": method, "ms": f"{ms:.4g}", "rate": f"{rate:.4g}",
                 "of_peak": f"{rate / case['peak_rate']:.3g}", "peak_MiB": f"{peak:.0f}"})


def git_commit(*paths: str) -> str:
    """HEAD's hash, with "+dirty" when tracked files under `paths` (all when none) have uncommitted changes."""

    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", *paths):
        commit += "+dirty"  # the numbers come from uncommitted code
    return commit


def environment() -> dict:
    commit = git_commit("gtacore/kernels", "bench")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (Triton interpreter)"
    return {"device": device, "torch": torch.__version__, "triton": triton_version, "commit": commit or "unknown"}


def report(rows: list[dict], path: Path, rate_name: str):
    """Print a table and write the CSV (one row per shape and method, plus the environment)."""
    env = environment()
    columns = [c for c in rows[0] if c != "peak_rate"] if rows else []
    columns = list(dict.fromkeys(columns + ["method", "ms", "rate", "of_peak", "peak_MiB"]))
    header = [rate_name if c == "rate" else c for c in columns]
    print(" | ".join(f"{k}={v}" for k, v in env.items()))
    print("  ".join(f"{h:>12}" for h in header))
    for row in rows:
        print("  ".join(f"{str(row.get(c, '')):>12}" for c in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header + list(env))
        writer.writeheader()
        for row in rows:
            writer.writerow({**{h: row.get(c, "") for h, c in zip(header, columns)}, **env})
    print(f"wrote {path}")
