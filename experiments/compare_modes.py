"""Run sft, grpo and gta on the same data, model and step budget; plot and tabulate them together.

    python experiments/compare_modes.py --out runs/compare [--max-steps 12] [-- extra train.py flags]

Each mode is one `train.py` run (same seed, batch, group size, lengths, learning rate
and evaluation sample); afterwards the script draws their curves on shared axes
(train reward, format rate, eval accuracy against step) and prints a table of the
final evaluation (accuracy, weighted F1, macro F1, format rate) with the step at
which each RL mode first reached the final reward of grpo. Results go to --out:
curves.png, results.md, results.csv (with the machine, versions and commit).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gtacore.plot import plot_runs, read_jsonl  # noqa: E402

MODES = ("sft", "grpo", "gta")


def first_step_reaching(rows: list[dict], target: float, window: int = 3) -> int | None:
    """First step whose trailing mean reward (over `window` steps) reaches `target`."""
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    for i in range(len(rewards)):
        recent = rewards[max(0, i - window + 1) : i + 1]
        if sum(recent) / len(recent) >= target:
            return i + 1
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare", help="output folder")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of sft,grpo,gta")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to every train.py run (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    modes = args.modes.split(",")
    for mode in modes:
        run_dir = out / mode
        cmd = [sys.executable, str(REPO / "train.py"), "--mode", mode, "--max-steps", str(args.max_steps),
               "--output-dir", str(run_dir), "--save-every", "0", "--overwrite", *extra]  # a rerun replaces the mode's run
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)

    runs = {m: {"metrics": read_jsonl(out / m / "metrics.jsonl"), "eval": read_jsonl(out / m / "eval.jsonl")} for m in modes}
    plot_runs([out / m for m in modes], out / "curves.png", title=f"sft vs grpo vs gta, {args.max_steps} steps")
    grpo_final = None
    if "grpo" in runs and runs["grpo"]["metrics"]:
        tail = [r["reward_mean"] for r in runs["grpo"]["metrics"][-3:]]
        grpo_final = sum(tail) / len(tail)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    rows = []
    for m in modes:
        final = runs[m]["eval"][-1] if runs[m]["eval"] else {}
        reach = first_step_reaching(runs[m]["metrics"], grpo_final) if grpo_final is not None and m != "sft" else None
        rows.append({"mode": m, "accuracy": final.get("accuracy"), "weighted_f1": final.get("weighted_f1"),
                     "macro_f1": final.get("macro_f1"), "format_rate": final.get("format_rate"),
                     "steps_to_grpo_final_reward": reach})
    header = "| mode | accuracy | weighted F1 | macro F1 | format rate | steps to grpo's final reward |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[k]) for k in ("mode", "accuracy", "weighted_f1", "macro_f1", "format_rate",
                                                          "steps_to_grpo_final_reward")) + " |")
    meta = (f"machine: {platform.machine()}, {platform.processor() or platform.system()}; python {platform.python_version()}; "
            f"torch {importlib.metadata.version('torch')}; commit {commit}; command: {' '.join(sys.argv)}")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + meta)
    (out / "results.md").write_text(table + "\n\n" + meta + f"\n\ngrpo final reward (mean of last 3 steps): {fmt(grpo_final)}\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["commit", "machine"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "commit": commit, "machine": platform.platform()})
    print(json.dumps({"curves": str(out / "curves.png"), "table": str(out / "results.md")}))


if __name__ == "__main__":
    main()
