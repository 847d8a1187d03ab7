"""A run's data, as its configuration names it: the training examples and their label set, the
worked examples drawn from them, and the seeded evaluation subset. Without --data, the bundled
emotion dataset (gtacore/bundled/, shipped in the wheel). Reading files: gtacore.data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .readers import decode_file
from .data import (EVAL_SPLITS, TRAIN_SPLITS, ClassificationData, DataError, Example, apply_recipe,
                   few_shot_examples, load_examples)


def load_dataset_from_args(path: str, shots_path: str | None, recipe: str | None, text_field: str, label_field: str,
                           labels: str | None, shots: int, seed: int, skip_unknown: bool = False,
                           label_set: list[str] | None = None, *, filters: str | None = None,
                           splits: Sequence[str] = TRAIN_SPLITS,
                           label_names: str | None = None) -> tuple[ClassificationData, list[Example]]:
    """Load `path` (a bare folder of splits: the first of `splits` it has); draw `shots` worked examples
    from `shots_path` (the training data). filters: the --filter flag (FIELD=VALUE,...); label_names:
    the --label-names flag (integer labels' names, in index order)."""
    label_names = parse_labels(label_names)
    if recipe:
        r = apply_recipe(recipe)
        text_field, label_field, label_names = r.text_field, r.label_field, list(r.label_names) if r.label_names else None
    allowed = label_set or parse_labels(labels) or label_names
    on_unknown, row_filter = "skip" if skip_unknown else "error", parse_filters(filters)
    data = load_examples(path, text_field, label_field, labels=allowed, label_names=label_names, on_unknown_label=on_unknown,
                         filters=row_filter, splits=splits)
    source = data if shots_path in (None, path) else load_examples(shots_path, text_field, label_field, labels=data.labels,
                                                                    label_names=label_names, on_unknown_label=on_unknown,
                                                                    filters=row_filter)
    if not shots:
        return data, []
    try:
        return data, few_shot_examples(source, shots, seed)
    except DataError as e:  # too few examples for the shots: name the file they come from
        raise DataError(f"{shots_path or path}: {e}") from None


BUNDLED_TRAIN = Path(__file__).resolve().parent / "bundled" / "emotion_train.jsonl"  # shipped in the wheel
BUNDLED_TEST = BUNDLED_TRAIN.with_name("emotion_test.jsonl")


def eval_subset(examples: list[Example], max_examples: int, seed: int) -> list[Example]:
    """At most `max_examples` (0 = all): a seeded sample, not the file's head, so a small budget
    still sees every class."""
    if not max_examples or max_examples >= len(examples):
        return examples
    return random.Random(seed).sample(examples, max_examples)


@dataclass
class RunData:
    train: ClassificationData
    labels: list[str]  # from the training file (or --labels / the recipe)
    shots: list[Example]  # worked examples, drawn from the training file
    eval_examples: list[Example]  # the seeded evaluation subset ([] without --eval-data)


def load_run_data(cfg, say=print) -> RunData:
    """A run's data as `cfg.data` (a gtacore.config.DataArgs) names it; without --data, the bundled
    emotion dataset (train and test split). A bare folder of splits gives its `train` split for
    --data and its `test` (else `validation`) split for --eval-data; --filter applies to both."""
    D, seed = cfg.data, cfg.run.seed
    if D.data is None:
        D.data, D.eval_data = str(BUNDLED_TRAIN), str(BUNDLED_TEST)
        say(f"data: {D.data} (bundled; pass --data FILE for your own)")
    train, shots = load_dataset_from_args(D.data, D.data, D.recipe, D.text_field, D.label_field, D.labels, D.shots, seed,
                                          D.skip_unknown_labels, filters=D.filter, label_names=D.label_names)
    eval_examples = []
    if D.eval_data:
        test, _ = load_dataset_from_args(D.eval_data, None, D.recipe, D.text_field, D.label_field, D.labels, 0, seed,
                                         D.skip_unknown_labels, label_set=train.labels, filters=D.filter,
                                         splits=EVAL_SPLITS, label_names=D.label_names)
        eval_examples = eval_subset(test.examples, D.max_eval_examples, seed)
    else:
        say("no --eval-data: the run is not evaluated before or after training")
    if D.filter:
        for name, part in (("--data", train), ("--eval-data", test if D.eval_data else None)):
            if part is not None:
                say(f"--filter {D.filter}: {name} kept {len(part.examples) + part.skipped} of "
                    f"{len(part.examples) + part.skipped + part.unmatched} rows")
    return RunData(train, train.labels, shots, eval_examples)


# --- the flags that name labels and filters ---

def read_label_file(path: str | Path) -> list[str]:
    """One label per line, in order; blank lines are ignored."""
    path = Path(path)
    lines = [(i, line.strip()) for i, line in enumerate(decode_file(path, "utf-8").split("\n"), 1)]
    labels, seen = [], set()
    for lineno, label in lines:
        if not label:
            continue
        if label in seen:
            raise DataError(f"{path}:{lineno}: duplicate label {label!r}")
        seen.add(label)
        labels.append(label)
    return labels


def parse_labels(labels: str | None) -> list[str] | None:
    """`a,b,c` or the path of a file with one label per line."""
    if labels is None:
        return None
    if Path(labels).is_file():
        return read_label_file(labels)
    return [x.strip() for x in labels.split(",") if x.strip()]


def parse_filters(text: str | None) -> dict[str, str]:
    """`field=value,field=value` (the --filter flag) as {field: value}; rows must match them all."""
    filters: dict[str, str] = {}
    for item in text.split(",") if text else []:
        field, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not field:
            raise DataError(f"--filter {text!r}: expected FIELD=VALUE[,FIELD=VALUE...], got {item!r}")
        if field in filters:
            raise DataError(f"--filter {text!r}: field {field!r} is given twice; a row has one value")
        filters[field] = value
    return filters
