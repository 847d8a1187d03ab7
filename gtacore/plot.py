"""Plot one or several runs' curves on shared axes: reward and format rate per step, eval accuracy,
the majority label's share of the answers, and the first run's answer labels over steps.

    python -m gtacore.plot runs/gta [runs/grpo runs/sft ...] [--out curves.png]

Reads each run's metrics.jsonl and eval.jsonl. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's log ([] where there is none yet); a last line a live run has not
    finished writing is left out, any other bad line is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line)) if line.strip() else None
        except ValueError as error:
            if lineno < len(lines):
                from gtacore.readers import DataError

                raise DataError(f"{path}:{lineno}: not a JSON record ({error})") from None
    return records


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib") from e
    panels = [("reward_mean", "train reward (mean)"), ("format_rate", "train format rate"), ("accuracy", "eval accuracy"),
              ("majority_label_share", "majority label share (dashed: greedy probe)")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 3.6))
    for i, run in enumerate(map(Path, run_dirs)):
        label, color = run.name, f"C{i}"  # one color per run on every panel
        metrics = read_jsonl(run / "metrics.jsonl")
        evals = read_jsonl(run / "eval.jsonl")
        for ax, (key, name) in zip(axes, panels):
            rows = evals if key == "accuracy" else metrics
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label, color=color)
            probe = [(r["step"], r["probe_majority_share"]) for r in rows if key == "majority_label_share"
                     and r.get("probe_majority_share") is not None]
            if probe:  # the greedy probe's, dashed beside the sampled answers'
                ax.plot(*zip(*probe), linestyle="--", marker="x", color=color)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    _label_shares(axes[-1], Path(run_dirs[0]))
    handles = {label: h for ax in axes[:-1] for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:  # one legend for the figure: a run may be missing from some panels (sft has no reward)
        fig.legend(handles.values(), handles.keys(), loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _label_shares(ax, run: Path) -> None:
    """Stacked shares of each answer label per step (label collapse: one band fills the panel)."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if any(k.startswith("answer_share/") for k in r)]
    labels = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("answer_share/")})
    if rows:
        ax.stackplot([r["step"] for r in rows], [[r.get(f"answer_share/{c}") or 0.0 for r in rows] for c in labels],
                     labels=labels)
        ax.legend(fontsize="small", loc="lower left")
    ax.set_title(f"answer labels, {run.name}")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="output directories of train.py runs")
    ap.add_argument("--out", default=None, help="PNG path (default: curves.png in the first run)")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    for run in map(Path, args.runs):
        if not (run / "metrics.jsonl").is_file():
            from gtacore.run_dir import RunFolderError

            raise RunFolderError(f"{run}: no metrics.jsonl here; pass the output folders of train.py runs")
    out = plot_runs(args.runs, args.out or Path(args.runs[0]) / "curves.png", args.title)
    print(f"wrote {out}")


if __name__ == "__main__":
    from gtacore.errors import main_with_user_errors

    main_with_user_errors(main)
