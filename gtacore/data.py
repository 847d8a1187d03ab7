"""Labelled texts: load them from JSONL/CSV/TSV/Parquet (gtacore/readers.py), name their
labels, and draw the worked examples.

Every bad input raises `DataError` naming the file and the line (the 1-based
file line for JSONL/CSV/TSV, the 1-based row for Parquet): a trainer that dies
on row 80,000 with a bare KeyError wastes the GPU hour before it.

Label set, in order of precedence: `labels` (the allowed set, order kept), else
`label_names` (index -> name), else the sorted unique labels found in the data.
Integer labels (and digit strings, when `label_names` is given) are indices into
`label_names`; other strings are label names.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import DataError, parse_labels, read_rows

log = logging.getLogger(__name__)

_INDEX = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '²' and Devanagari digits


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str  # "file:line", so later errors and debugging point back at the row


@dataclass
class ClassificationData:
    examples: list[Example]
    labels: list[str]  # the ordered label set, as the prompt lists it
    skipped: int = 0  # rows dropped by on_unknown_label="skip"


# ---------------------------------------------------------------------------
# Recipes for the public exports of the paper's four datasets.
# Use: load_examples(path, **dataclasses.asdict(apply_recipe("sst5"))).


@dataclass(frozen=True)
class Recipe:
    text_field: str
    label_field: str
    label_names: tuple[str, ...] | None = None  # index -> name; None: the field holds names


RECIPES: dict[str, Recipe] = {
    # SetFit/sst5 (columns text, label, label_text): label 0-4 is SST's
    # fine-grained scale from most negative to most positive; SetFit's
    # label_text column spells the same names in the same order.
    "sst5": Recipe("text", "label", ("very negative", "negative", "neutral", "positive", "very positive")),
    # dair-ai/emotion (columns text, label): the ClassLabel names of its
    # dataset card, in index order.
    "emotion": Recipe("text", "label", ("sadness", "joy", "love", "anger", "fear", "surprise")),
    # AmazonScience/massive, scenario task (columns utt, scenario, ...). The raw
    # release (amazon-massive-dataset-1.x, one JSONL per locale, all partitions
    # in one file) stores scenario as a name, which passes through; the Hugging
    # Face Parquet export stores a ClassLabel index in the order of the _SCENARIOS
    # list of its loading script, reproduced here. Select the locale (the paper:
    # en-US) and the partition before loading.
    "massive": Recipe(
        "utt",
        "scenario",
        ("social", "transport", "calendar", "play", "news", "datetime", "recommendation", "email", "iot",
         "general", "audio", "lists", "qa", "cooking", "takeaway", "music", "alarm", "weather"),
    ),
    # SetFit/bbc-news (columns text, label, label_text): we could not confirm the
    # index order of `label` from a primary source, so read the names from
    # label_text (business, entertainment, politics, sport, tech) instead.
    "bbc_news": Recipe("text", "label_text", None),
}


def apply_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DataError(f"unknown dataset recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


# ---------------------------------------------------------------------------
# Loading.


def load_examples(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    labels: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    on_unknown_label: str = "error",
    encoding: str = "utf-8",
) -> ClassificationData:
    """Read a .jsonl/.json (JSON Lines), .csv, .tsv or .parquet file of labelled texts.

    on_unknown_label: "error" stops at the first label outside `labels` or
    `label_names`; "skip" drops such rows and counts them in `.skipped`.
    Texts and labels are stripped of surrounding whitespace.
    """
    if on_unknown_label not in ("error", "skip"):
        raise ValueError(f"on_unknown_label must be 'error' or 'skip', got {on_unknown_label!r}")
    path = Path(path)
    allowed = _label_list(labels, "labels")
    names = _label_list(label_names, "label_names")
    label_set = allowed if allowed is not None else names
    known = set(label_set) if label_set is not None else None

    examples, skipped = [], 0
    for lineno, row in read_rows(path, (text_field, label_field), encoding):
        where = f"{path}:{lineno}"
        text = _text(row, text_field, where)
        label = _label(row, label_field, names, allowed, where)
        if known is not None and label not in known:
            if on_unknown_label == "skip":
                skipped += 1
                continue
            raise DataError(
                f"{where}: label {label!r} is not in the label set {label_set}; "
                "fix the label list or pass on_unknown_label='skip' to drop such rows"
            )
        examples.append(Example(text, label, where))

    if skipped:
        log.warning("%s: skipped %d rows with labels outside the label set", path, skipped)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({skipped} rows skipped: unknown labels)" if skipped else ""))
    final = list(label_set) if label_set is not None else sorted({e.label for e in examples})
    return ClassificationData(examples, final, skipped)


def _label_list(labels: Sequence[str] | None, what: str) -> list[str] | None:
    if labels is None:
        return None
    out = [str(label).strip() for label in labels]
    if not out or not all(out):
        raise DataError(f"{what}: need a non-empty list of non-empty labels, got {list(labels)!r}")
    dup = sorted({label for label in out if out.count(label) > 1})
    if dup:
        raise DataError(f"{what}: duplicate labels {dup}")
    return out


def _text(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: no field {field!r}; fields are {sorted(row)}")
    text = row[field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__} {text!r}")
    if text is None or not text.strip():
        raise DataError(f"{where}: empty text in field {field!r}")
    return text.strip()


def _label(row: dict, field: str, names: list[str] | None, allowed: list[str] | None, where: str) -> str:
    if field not in row:
        raise DataError(f"{where}: no field {field!r}; fields are {sorted(row)}")
    raw = row[field]
    if isinstance(raw, str):
        raw = raw.strip()
    if raw is None or raw == "":
        raise DataError(f"{where}: empty label in field {field!r}")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise DataError(f"{where}: label must be a string or an integer, got {type(raw).__name__} {raw!r}")
    if isinstance(raw, str) and _INDEX.fullmatch(raw):
        if names is not None:
            raw = int(raw)
        elif allowed is None or raw not in allowed:
            # CSV gives every cell as a string, so "3" is almost surely a class
            # index: training on the label "3" would teach the model nothing.
            raise DataError(
                f"{where}: label {raw!r} looks like a class index but no label names were given; "
                "pass label_names (index -> name, e.g. via a dataset recipe), or list it in labels "
                "to use it as a name"
            )
    if isinstance(raw, int):
        if names is None:
            raise DataError(
                f"{where}: integer label {raw} but no label names; pass label_names (index -> name), "
                "e.g. via a dataset recipe"
            )
        if not 0 <= raw < len(names):
            raise DataError(f"{where}: label index {raw} is out of range for {len(names)} label names {names}")
        return names[raw]
    return raw


def few_shot_examples(data: ClassificationData, k: int, seed: int) -> list[Example]:
    """k worked examples for the prompt, one per label in turn (label order shuffled by seed)."""
    return [data.examples[i] for i in _few_shot_indices(data, k, seed)]


def split_examples(data: ClassificationData, k: int, seed: int) -> tuple[list[Example], ClassificationData]:
    """The few-shot examples and the data without them, so that no prompt shows
    the model the very example it is asked to classify."""
    picked = _few_shot_indices(data, k, seed)
    taken = set(picked)
    rest = [e for i, e in enumerate(data.examples) if i not in taken]
    return [data.examples[i] for i in picked], ClassificationData(rest, list(data.labels), data.skipped)


def _few_shot_indices(data: ClassificationData, k: int, seed: int) -> list[int]:
    if not 0 <= k <= len(data.examples):
        raise DataError(f"cannot pick {k} few-shot examples from {len(data.examples)}")
    rng = np.random.default_rng(seed)
    queues: dict[str, list[int]] = {label: [] for label in data.labels}
    for i in rng.permutation(len(data.examples)).tolist():
        queues[data.examples[i].label].append(i)
    # Shuffled label order: with k < number of labels, a fixed order would always
    # show the same first labels, and the last shot's label would bias the answer.
    order = [data.labels[j] for j in rng.permutation(len(data.labels)).tolist()]
    picked: list[int] = []
    while len(picked) < k:
        for label in order:
            if queues[label] and len(picked) < k:
                picked.append(queues[label].pop())
    return picked


def load_dataset_from_args(path: str, shots_path: str | None, recipe: str | None, text_field: str, label_field: str,
                           labels: str | None, shots: int, seed: int, skip_unknown: bool = False,
                           label_set: list[str] | None = None) -> tuple[ClassificationData, list[Example]]:
    """Load `path`; draw `shots` worked examples from `shots_path` (the training file)."""
    label_names = None
    if recipe:
        r = apply_recipe(recipe)
        text_field, label_field, label_names = r.text_field, r.label_field, list(r.label_names) if r.label_names else None
    allowed = label_set or parse_labels(labels) or label_names
    on_unknown = "skip" if skip_unknown else "error"
    data = load_examples(path, text_field, label_field, labels=allowed, label_names=label_names, on_unknown_label=on_unknown)
    source = data if shots_path in (None, path) else load_examples(shots_path, text_field, label_field, labels=data.labels,
                                                                    label_names=label_names, on_unknown_label=on_unknown)
    if not shots:
        return data, []
    try:
        return data, few_shot_examples(source, shots, seed)
    except DataError as e:  # too few examples for the shots: name the file they come from
        raise DataError(f"{shots_path or path}: {e}") from None


BUNDLED_TRAIN = Path(__file__).resolve().parents[1] / "data" / "emotion_train.jsonl"
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
    emotion dataset (train and test split)."""
    D, seed = cfg.data, cfg.run.seed
    if D.data is None:
        D.data, D.eval_data = str(BUNDLED_TRAIN), str(BUNDLED_TEST)
        say(f"data: {D.data} (bundled; pass --data FILE for your own)")
    train, shots = load_dataset_from_args(D.data, D.data, D.recipe, D.text_field, D.label_field, D.labels, D.shots, seed,
                                          D.skip_unknown_labels)
    eval_examples = []
    if D.eval_data:
        test, _ = load_dataset_from_args(D.eval_data, None, D.recipe, D.text_field, D.label_field, D.labels, 0, seed,
                                         D.skip_unknown_labels, label_set=train.labels)
        eval_examples = eval_subset(test.examples, D.max_eval_examples, seed)
    return RunData(train, train.labels, shots, eval_examples)
