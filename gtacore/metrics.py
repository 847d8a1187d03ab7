"""Classification metrics over label strings, as the paper reports them.

A prediction is a label name, or None when the completion did not parse. None
(and any string outside the label set) counts as wrong and lands in its own
"invalid" column of the confusion matrix. It is never a false positive of any
class, which is what scikit-learn computes when such predictions carry a
placeholder name that is left out of its `labels=` argument.

Per class c: precision = TP / (TP + FP), recall = TP / support, F1 = 2PR / (P + R),
each 0 when its denominator is 0 (scikit-learn's zero_division=0). Macro F1 is
the unweighted mean over the label set; weighted F1 weights each class's F1 by
its support (scikit-learn's average="weighted").
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

INVALID = "invalid"  # name of the confusion-matrix column for unparseable predictions


def _div(num: float, den: float) -> float:
    return num / den if den else 0.0


def classification_report(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, weighted and macro F1, per-class scores and the confusion matrix.

    Returns {"n", "accuracy", "weighted_f1", "macro_f1", "invalid", "invalid_rate",
    "per_class": {label: {"precision", "recall", "f1", "support"}},
    "confusion": {"rows": labels, "columns": labels + ["invalid"], "matrix": [[int]]}}
    where matrix[i][j] counts gold rows[i] predicted as columns[j].
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no examples to score")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels in {labels}")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(gold) - index.keys())
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {labels}")

    C = len(labels)
    matrix = [[0] * (C + 1) for _ in range(C)]  # [C, C + 1]: the last column is "invalid"
    for g, p in zip(gold, pred):
        matrix[index[g]][index.get(p, C)] += 1  # None and unknown strings -> invalid

    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(C))
        support = sum(matrix[i])
        precision, recall = _div(tp, predicted), _div(tp, support)
        f1 = _div(2 * precision * recall, precision + recall)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}

    n = len(gold)
    invalid = sum(row[C] for row in matrix)
    return {
        "n": n,
        "accuracy": sum(matrix[i][i] for i in range(C)) / n,
        "weighted_f1": sum(s["f1"] * s["support"] for s in per_class.values()) / n,
        "macro_f1": sum(s["f1"] for s in per_class.values()) / C,
        "invalid": invalid,
        "invalid_rate": invalid / n,
        "per_class": per_class,
        "confusion": {"rows": list(labels), "columns": [*labels, INVALID], "matrix": matrix},
    }


def guess_answer_changes(gold: list[str], guess: list[str | None], answer: list[str | None]) -> dict:
    """How the answer relates to the guess: counts and rates (over n) of
    right_to_right, right_to_wrong, wrong_to_right, wrong_to_wrong ("right" is
    equal to gold; None is wrong), and unchanged/changed (answer == guess or not,
    two invalid parts counting as unchanged). Also guess and answer accuracy."""
    if not len(gold) == len(guess) == len(answer):
        raise ValueError(f"lengths differ: {len(gold)} gold, {len(guess)} guesses, {len(answer)} answers")
    if not gold:
        raise ValueError("no examples to score")
    counts = dict.fromkeys(
        ["right_to_right", "right_to_wrong", "wrong_to_right", "wrong_to_wrong", "unchanged", "changed"], 0
    )
    for y, g, a in zip(gold, guess, answer):
        before = "right" if g == y else "wrong"
        after = "right" if a == y else "wrong"
        counts[f"{before}_to_{after}"] += 1
        counts["unchanged" if g == a else "changed"] += 1
    n = len(gold)
    out: dict = {"n": n}
    for key, count in counts.items():
        out[key] = count
        out[f"{key}_rate"] = count / n
    out["guess_accuracy"] = (counts["right_to_right"] + counts["right_to_wrong"]) / n
    out["answer_accuracy"] = (counts["right_to_right"] + counts["wrong_to_right"]) / n
    return out


def label_distribution(kind: str, counts: dict[str, float]) -> dict[str, float | None]:
    """Label collapse at a glance, from counts {label: n} of the predictions that name a label:
    f"{kind}_share/{label}" (each label's share of them), f"{kind}_label_entropy" (natural log;
    0 when one label takes everything, log C when C labels share equally) and
    f"majority_{kind}_share" (the largest share). For answers the last is `majority_label_share`.
    With no prediction naming a label, every share is 0 and the last two are left out."""
    total = sum(counts.values())
    shares = {label: _div(n, total) for label, n in counts.items()}
    out: dict[str, float | None] = {f"{kind}_share/{label}": share for label, share in shares.items()}
    if total:
        out[f"{kind}_label_entropy"] = -sum(p * math.log(p) for p in shares.values() if p > 0)
        out["majority_label_share" if kind == "answer" else f"majority_{kind}_share"] = max(shares.values())
    return out


def label_counts(predictions: list[str | None], labels: list[str]) -> dict[str, int]:
    """{label: how many predictions name it}, in label-set order; invalid predictions are left out."""
    return {label: sum(p == label for p in predictions) for label in labels}


def majority(report: dict, kind: str = "answer") -> tuple[str | None, float]:
    """The label with the largest f"{kind}_share/..." in a metrics dict, and its share."""
    prefix = f"{kind}_share/"
    shares = {k[len(prefix):]: v for k, v in report.items() if k.startswith(prefix) and v is not None}
    if not shares:
        return None, 0.0
    label = max(shares, key=shares.get)
    return label, shares[label]


class CollapseWatch:
    """Warns while one label takes more than `share` of the answers for `steps` steps in a row.
    The mean reward can rise while a policy collapses onto one label (it learns the format), so
    this watches the answers themselves: the sampled ones of each step, and the greedy probe's
    (gtacore.probe), whose latest result stands until the next probe. Greedy answers, which
    users deploy, can collapse while the sampled ones still vary."""

    def __init__(self, share: float, steps: int):
        self.share, self.steps, self.label, self.run, self.probe = share, steps, None, 0, {}

    def update(self, metrics: dict) -> str | None:
        """A step's metrics -> a warning naming the label, or None."""
        self.probe = {k: v for k, v in metrics.items() if k.startswith("probe_share/")} or self.probe
        (label, share), where = majority(metrics), "sampled answers"
        probe_label, probe_share = majority(self.probe, "probe")
        if probe_share > share:
            label, share, where = probe_label, probe_share, "greedy probe's answers"
        over = label is not None and share > self.share
        self.run = self.run + 1 if over and label == self.label else int(over)
        self.label = label if over else None
        if not self.steps or self.run < self.steps:
            return None
        gold = metrics.get(f"gold_share/{label}") or 0.0
        return (f"label collapse? '{label}' took {share:.0%} of the {where} for {self.run} steps in a row "
                f"(its gold share this step: {gold:.0%})")


def format_table(report: dict) -> str:
    """A plain-text rendering of classification_report's output."""
    labels = report["confusion"]["rows"]
    width = max(len("weighted F1"), *(len(label) for label in labels))
    lines = [f"{'label':<{width}}  precision  recall      f1  support"]
    for label, s in report["per_class"].items():
        lines.append(
            f"{label:<{width}}  {s['precision']:9.4f}  {s['recall']:6.4f}  {s['f1']:6.4f}  {s['support']:7d}"
        )
    lines.append("")
    lines.append(f"{'accuracy':<{width}}  {report['accuracy']:.4f}  (n = {report['n']})")
    lines.append(f"{'macro F1':<{width}}  {report['macro_f1']:.4f}")
    lines.append(f"{'weighted F1':<{width}}  {report['weighted_f1']:.4f}")
    lines.append(f"{'invalid':<{width}}  {report['invalid_rate']:.4f}  ({report['invalid']} predictions)")

    # Confusion matrix: rows gold, columns predicted; each column as wide as its name or its largest count.
    columns, matrix = report["confusion"]["columns"], report["confusion"]["matrix"]
    widths = [max(len(c), *(len(str(row[j])) for row in matrix)) for j, c in enumerate(columns)]
    lines.append("")
    corner = "gold \\ pred"
    lines.append(f"{corner:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for label, row in zip(labels, matrix):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(row, widths)))
    return "\n".join(lines)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class Stopwatch:
    """Seconds per stage: `with clock("rollout"): ...` adds the block's time to clock.seconds["rollout"].

    On a GPU the time is the host's (kernels may still run): a stage that syncs absorbs it."""

    def __init__(self, *stages: str):
        self.seconds = dict.fromkeys(stages, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


class StepMetrics:
    """A training step's scalars, kept on the device until `reduce`: the step's one metrics sync.

    Token averages are kept as (sum, count), so a rank whose rollouts left no RL token adds
    nothing to them; the rest are rank means (losses are global-batch means already).
    """

    def __init__(self):
        self.values: dict = {}

    def add(self, **values) -> None:
        self.values.update(values)

    def rollout(self, rewards: torch.Tensor, parsed: list, golds: list[str], labels: list[str], num_tokens: int,
                seconds: float, mode: str) -> None:
        n = len(golds)
        self.labels(parsed, golds, labels, mode)
        self.add(reward_mean=rewards.mean(), reward_std=rewards.std() if n > 1 else torch.tensor(0.0),
                 format_rate=sum(p.format_ok for p in parsed) / n,
                 train_accuracy=sum(p.answer == y for p, y in zip(parsed, golds)) / n,
                 completion_length=num_tokens / n, rollout_tokens_per_s=num_tokens / max(seconds, 1e-9))
        if mode == "gta":
            self.add(guess_accuracy=sum(p.guess == y for p, y in zip(parsed, golds)) / n)

    def labels(self, parsed: list, golds: list[str], labels: list[str], mode: str) -> None:
        """The step's label counts (answers, gta guesses, and the gold labels of the same
        rollouts); `reduce` turns the global counts into shares, entropies and majority shares."""
        kinds = {"answer": [p.answer for p in parsed], "gold": golds}
        if mode == "gta":
            kinds["guess"] = [p.guess for p in parsed]
        for kind, values in kinds.items():
            self.add(**{f"{kind}_count/{label}": n for label, n in label_counts(values, labels).items()})

    def losses(self, sft, rl) -> None:
        """From the SFT and RL branches' FusedGTALoss (None where the mode has none)."""
        if sft is not None:
            self.add(sft_loss=sft.sft_loss)
        if rl is not None:
            s, n = rl.stats, torch.tensor(float(rl.stats["kl"].numel()))
            self.add(rl_loss=rl.rl_loss, kl=(s["kl"].sum(), n), clip_fraction=(s["clipped"].float().sum(), n),
                     entropy=(s["entropy"].sum(), n))

    def constraint(self, stats) -> None:
        self.add(grad_cosine=stats.cosine, conflict_fraction=stats.conflict_fraction_params,
                 conflict_fraction_elements=stats.conflict_fraction_elements)

    def reduce(self, info) -> dict:
        """Means over ranks, as plain floats (None where not finite: JSON has no NaN), plus peak memory."""
        names = sorted(self.values)
        pairs = [self.values[k] if isinstance(self.values[k], tuple) else (self.values[k], 1.0) for k in names]
        flat = [torch.as_tensor(x, dtype=torch.float64, device=info.device).reshape(()) for pair in pairs for x in pair]
        values = torch.stack(flat)
        if info.distributed:
            dist.all_reduce(values)
            values /= info.world_size
        sums, counts = values.view(-1, 2).unbind(1)  # [len(names)] each
        out = {k: v / c if c > 0 and math.isfinite(v / c) else None for k, v, c in zip(names, sums.tolist(), counts.tolist())}
        for kind in ("answer", "guess", "gold"):  # rank means of counts: the global distribution, scaled
            prefix = f"{kind}_count/"
            counts_ = {k[len(prefix):]: out.pop(k) for k in [k for k in out if k.startswith(prefix)]}
            if counts_:
                out |= label_distribution(kind, counts_)
        return out | {"peak_memory_gb": peak_memory_gb(info.device)}


def print_summary(before: dict | None, after: dict | None, out_dir: Path, title: str, estimated_peak: float,
                  device: torch.device) -> None:
    """The end of a run on screen: the evaluation table, before vs after, the curves, memory."""
    if after is not None:
        print("\n" + format_table(after))
        if before is not None:
            print(f"\n{'metric':<16}{'before':>10}{'after':>10}")
            for k in ("accuracy", "weighted_f1", "format_rate", "guess_accuracy"):
                if k in after:
                    print(f"{k:<16}{before.get(k, float('nan')):>10.3f}{after[k]:>10.3f}")
            print(f"\n{'recall per class':<16}{'before':>10}{'after':>10}")  # collapsed: 1 on one class, 0 on the rest
            for label, s in after["per_class"].items():
                print(f"  {label:<14}{before['per_class'][label]['recall']:>10.3f}{s['recall']:>10.3f}")
            print(f"{'majority share':<16}{before.get('majority_label_share', 0):>10.3f}{after.get('majority_label_share', 0):>10.3f}")
    try:
        from .plot import plot_runs

        print(f"curves: {plot_runs([out_dir], out_dir / 'curves.png', title=title)}")
    except SystemExit as e:  # matplotlib is optional
        print(f"no plot: {e}")
    print(f"peak memory: {peak_memory_gb(device):.3f} GB measured "
          f"({'allocated by torch' if device.type == 'cuda' else 'process RSS'}), {estimated_peak / 1e9:.3f} GB estimated")
    print(f"outputs in {out_dir}")
