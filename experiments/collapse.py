"""Label collapse: the default configuration and principled variants at equal budget, several seeds.

    python experiments/collapse.py --out runs/collapse [--runs default:0,1,2 noscale:0 ...] [-- extra train.py flags]

Each run is one `train.py` (same data, model, steps, batch and group size; only the variant's
flags and the seed differ), then `python -m gtacore.evaluate --run DIR --max-examples 0`: the
final model on the whole test split. The table gives, per variant, the mean and spread (min-max)
over its seeds of accuracy, macro F1 and the majority label's share of the test answers, and the
last training step's majority share. Results go to --out: results.md, results.csv,
collapse.png (majority share per step, one line per run), with the machine, versions and commit.
Runs already finished in --out are read, not redone; --previous adds the rows of an earlier
results.csv (runs made at another commit, whose folders are gone) to the table, with their commit.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gtacore.plot import read_jsonl  # noqa: E402

# name -> (train.py flags, why it might avoid collapse)
VARIANTS = {
    "default": ((), "the defaults"),
    "grpo": (("--mode", "grpo"), "RL only: the collapse reference"),
    "sft2": (("--lambda-sft", "2"), "a stronger SFT pull of the guess toward the gold label"),
    "noscale": (("--no-scale-std",), "Dr. GRPO: no division by the group std, which inflates tiny reward gaps"),
    "kl": (("--beta", "0.04"), "a KL leash to the reference model"),
    "lr1e-5": (("--lr", "1e-5"), "half the learning rate"),
    "shots3": (("--shots", "3"), "three worked examples, spread over labels"),
    "shots6": (("--shots", "6"), "one worked example per label (the bundled data has six)"),
    "b8g4": (("--batch-size", "8", "--group-size", "4"), "twice the prompts per step, half the group: more gold labels per update"),
    "g16": (("--batch-size", "2", "--group-size", "16"), "half the prompts per step, twice the group: finer advantages"),
}


def run_one(out: Path, name: str, seed: int, extra: list[str]) -> dict:
    run_dir = out / f"{name}-s{seed}"
    report = run_dir / "test_eval.json"
    if not report.is_file():
        t0 = time.time()
        cmd = [sys.executable, str(REPO / "train.py"), *VARIANTS[name][0], "--seed", str(seed), "--output-dir",
               str(run_dir), "--save-every", "0", "--no-progress", "--overwrite", *extra]  # unfinished: redone
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        cmd = [sys.executable, "-m", "gtacore.evaluate", "--run", str(run_dir), "--max-examples", "0", "--output", str(report)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (run_dir / "minutes.txt").write_text(f"{(time.time() - t0) / 60:.1f}\n")
    test = json.loads(report.read_text())
    steps = read_jsonl(run_dir / "metrics.jsonl")
    return {"variant": name, "seed": seed, "accuracy": test["accuracy"], "macro_f1": test["macro_f1"],
            "test_majority_share": test.get("majority_label_share", 0.0),
            "train_majority_share": steps[-1].get("majority_label_share", 0.0) if steps else 0.0,
            "minutes": float((run_dir / "minutes.txt").read_text()) if (run_dir / "minutes.txt").is_file() else float("nan")}


def previous_row(r: dict) -> dict:
    """A row of an earlier results.csv, numbers parsed, its commit kept."""
    return {k: (v if k in ("variant", "commit", "machine", "torch") else int(v) if k == "seed" else float(v))
            for k, v in r.items()}


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/collapse")
    ap.add_argument("--runs", nargs="+", default=["default:0,1,2", "noscale:0", "kl:0"],
                    help=f"variant:seeds, variants from {', '.join(VARIANTS)}")
    ap.add_argument("--previous", nargs="*", default=[], help="earlier results.csv files whose rows join the table")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every train.py run (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    rows = [previous_row(r) for path in args.previous for r in csv.DictReader(open(path))]
    for spec in args.runs:
        name, seeds = spec.split(":")
        for seed in map(int, seeds.split(",")):
            rows.append(run_one(out, name, seed, extra))
            write_results(out, rows)


def write_results(out: Path, rows: list[dict]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with open(out / "results.csv", "w", newline="") as f:
        here = {"commit": commit, "machine": platform.machine(), "torch": importlib.metadata.version("torch")}
        rows = [r | {k: r.get(k, v) for k, v in here.items()} for r in rows]  # an earlier row keeps its commit
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| variant | seeds | accuracy | macro F1 | test majority share | last step majority share | minutes per run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cells = [spread([r[k] for r in mine]) for k in ("accuracy", "macro_f1", "test_majority_share", "train_majority_share")]
        lines.append(f"| {name} ({VARIANTS[name][1]}) | {','.join(str(r['seed']) for r in mine)} | {' | '.join(cells)} | "
                     f"{spread([r['minutes'] for r in mine])} |")
    commits = ", ".join(dict.fromkeys(r["commit"] for r in rows))
    (out / "results.md").write_text("\n".join(lines) + f"\n\ncommit {commits}, {platform.machine()}, "
                                    f"torch {importlib.metadata.version('torch')}\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(rows):
        metrics = out / f"{r['variant']}-s{r['seed']}" / "metrics.jsonl"
        steps = read_jsonl(metrics) if metrics.is_file() else []
        points = [(s["step"], s["majority_label_share"]) for s in steps if "majority_label_share" in s]
        if points:
            ax.plot(*zip(*points), label=f"{r['variant']} s{r['seed']}", color=f"C{list(VARIANTS).index(r['variant'])}",
                    alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("majority label share (train answers)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "collapse.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
