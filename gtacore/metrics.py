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
