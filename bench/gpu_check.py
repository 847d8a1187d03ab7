"""The one prepared GPU check: every part under its own time limit, most valuable first, so a
timeout loses only the tail. Writes OUT/summary.md (printed at the end) and OUT/logs.tar.gz
(every log and CSV): two files.

    python3 bench/gpu_check.py OUT             # on the GPU machine, under 8 minutes on one H200
    python3 bench/gpu_check.py --dry-run OUT   # every part at tiny shapes on CPU, under 3 minutes

Parts: 1 versions; 2 GPU tests (kernels at V = 151936 with N x V past 2^31 elements, fused and
chunked loss against their references, attention kernels) and 2-step train.py runs under
bf16-mixed in each mode and with FSDP on one GPU; 3 kernel benchmarks at the headline shapes;
4 decode against transformers; 5 one GTA step at the Qwen2.5-1.5B shape. Needs nothing from the
network; what is not installed (liger-kernel, transformers) is skipped by the scripts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def parts(out: Path, dry: bool) -> list[tuple[str, list[list[str]], int]]:
    """(name, commands, seconds allowed) in order of value."""
    csv = lambda name: ["--csv", str(out / f"{name}.csv")]  # noqa: E731
    tiny = ["--warmup", "0", "--reps", "1", "--no-compile"] if dry else []
    versions = [PY, "-c", "import torch, triton, platform; print('python', platform.python_version()); "
                "print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); "
                "print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"]
    tests = ["tests/test_attention.py"] if dry else ["tests/test_kernels.py", "tests/test_gta_loss.py",
                                                     "tests/test_fused_linear.py", "tests/test_attention.py",
                                                     "tests/test_gpu_scale.py", "tests/test_custom_ops.py",
                                                     "tests/test_fake_gpu.py"]
    return [
        ("versions", [versions], 30),
        ("gpu tests", [[PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                       [PY, str(REPO / "bench" / "gpu_check.py"), "--train-runs", str(out / "train"), *(["--cpu"] if dry else [])]],
         200),
        ("kernel benchmarks", [
            [PY, "bench/bench_selective_logprobs.py", *tiny, *([] if dry else ["--N", "16384", "--V", "151936"]),
             *csv("selective_logprobs")],
            [PY, "bench/bench_gta_loss.py", *tiny, *([] if dry else ["--N", "16384", "--V", "151936"]), *csv("gta_loss")],
            [PY, "bench/bench_fused_linear.py", *tiny, *([] if dry else ["--N", "16384", "--V", "151936", "--D", "896", "3584"]),
             *csv("fused_linear")]], 150),
        ("decode", [[PY, "bench/bench_decode.py", *csv("decode")]], 100),
        ("gta step", [[PY, "bench/bench_step.py", *csv("step")]], 60),
    ]


def train_runs(out: Path, cpu: bool) -> None:
    """2-step train.py runs under bf16-mixed: each mode, and FSDP (torchrun, one rank)."""
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import write_dataset, write_tiny_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    model, data = write_tiny_checkpoint(out / "model"), write_dataset(out / "train.jsonl", 24)
    test = write_dataset(out / "test.jsonl", 6, seed=1)
    common = ["--model", str(model), "--data", str(data), "--eval-data", str(test), "--max-steps", "2", "--batch-size", "2",
              "--group-size", "4", "--max-new-tokens", "16", "--no-progress", "--precision", "bf16-mixed",
              "--device", "cpu" if cpu else "cuda"]
    runs = {mode: [PY, "train.py", "--mode", mode, "--num-iterations", "2", "--beta", "0.04"] for mode in ("gta", "grpo", "sft")}
    runs["gta-fsdp"] = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py", "--shard", "fsdp"]
    for name, cmd in runs.items():
        res = subprocess.run([*cmd, *common, "--output-dir", str(out / name), "--overwrite"], cwd=REPO, capture_output=True, text=True)
        print(f"train {name}: {'ok' if res.returncode == 0 else 'FAILED'}", flush=True)
        if res.returncode != 0:
            print(res.stdout[-2000:] + res.stderr[-4000:])
            raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "runs/gpu_check"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, to prove the script before a GPU run")
    ap.add_argument("--train-runs", type=Path, help=argparse.SUPPRESS)  # part 2's second command
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_runs:
        return train_runs(args.train_runs, args.cpu)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    if args.dry_run:
        env |= {"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    lines = ["| part | status | seconds | limit |", "| --- | --- | --- | --- |"]
    logs = []
    for i, (name, commands, limit) in enumerate(parts(out, args.dry_run), 1):
        log = out / f"{i}_{name.replace(' ', '_')}.log"
        logs.append(log)
        t0, status = time.time(), "ok"
        with open(log, "w") as f:
            for cmd in commands:
                left = limit - (time.time() - t0)
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                try:
                    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(left, 1)).returncode
                except subprocess.TimeoutExpired:
                    status = "timeout"
                    break
                if rc != 0:
                    status = f"failed (exit {rc})"
        seconds = time.time() - t0
        lines.append(f"| {i} {name} | {status} | {seconds:.0f} | {limit} |")
        print(lines[-1], flush=True)
    summary = out / "summary.md"
    tables = [f"\n## {p.stem}\n\n" + "\n".join(tail(p)) for p in sorted(out.glob("*.csv"))]
    summary.write_text("# GPU check" + (" (dry run)" if args.dry_run else "") + "\n\n" + "\n".join(lines) + "\n" + "".join(tables))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in [*logs, *out.glob("*.csv")]:
            tar.add(path, arcname=path.name)
    for path in [*logs, *out.glob("*.csv")]:  # all of it is in the archive: at most 8 files come back
        path.unlink()
    if (out / "train").exists():
        subprocess.run(["rm", "-rf", str(out / "train")])
    print(summary.read_text())


def tail(csv_path: Path, n: int = 40) -> list[str]:
    """A CSV as Markdown rows (its first n)."""
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[: n + 1]]
    if not rows:
        return []
    return ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


if __name__ == "__main__":
    main()
