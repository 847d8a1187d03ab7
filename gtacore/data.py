"""Labelled texts: load them from JSONL/CSV/TSV/Parquet/Arrow files or Hugging Face exports
(gtacore/readers.py), name their labels, and draw the worked examples.

Every bad input raises `DataError` naming the file and the line (the 1-based
file line for JSONL/CSV/TSV, the 1-based row for Parquet/Arrow): a trainer that dies
on row 80,000 with a bare KeyError wastes the GPU hour before it.

Label names (index -> name): `label_names`, else the names of the label field's
ClassLabel feature in a Hugging Face export. Label set, in order of precedence:
`labels` (the allowed set, order kept), else the label names, else the sorted
unique labels found in the data. Integer labels (and digit strings, when there are
label names) are indices into the label names; other strings are label names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import DataError, read_rows

log = logging.getLogger(__name__)

_INDEX = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '²' and Devanagari digits


TRAIN_SPLITS = ("train",)  # the split a bare folder of splits gives for training...
EVAL_SPLITS = ("test", "validation")  # ...and for evaluation: the first one it has


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
    unmatched: int = 0  # rows --filter left out


# ---------------------------------------------------------------------------
# Recipes for the public exports of the paper's four datasets.
# Use: load_examples(path, **dataclasses.asdict(apply_recipe("sst5"))). Where an export also
# names its labels (ClassLabel features), the recipe's names must agree with them.


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
    # dataset card, in index order. Not the bundled emotion data (data/README.md),
    # whose labels are names (with disgust, without love) and need no recipe.
    "dair_emotion": Recipe("text", "label", ("sadness", "joy", "love", "anger", "fear", "surprise")),
    # AmazonScience/massive, scenario task (columns utt, scenario, ...). The raw
    # release (amazon-massive-dataset-1.x, one JSONL per locale, all partitions
    # in one file) stores scenario as a name, which passes through; the Hugging
    # Face export stores a ClassLabel index in the order of the _SCENARIOS
    # list of its loading script, reproduced here. Select the locale (the paper:
    # en-US) and, in the raw release, the partition with filters (--filter
    # locale=en-US,partition=train). The intent task: --text-field utt
    # --label-field intent, named by the export's ClassLabel (60 intents).
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
    if name == "emotion":  # once the name of dair_emotion; the bundled data is called emotion too
        raise DataError("recipe 'emotion' is ambiguous: use --recipe dair_emotion for the Hub's dair-ai/emotion "
                        "(sadness, joy, love, anger, fear, surprise); the bundled emotion data names its labels "
                        "and takes no recipe")
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
    filters: Mapping[str, str] | None = None,
    splits: Sequence[str] = TRAIN_SPLITS,
) -> ClassificationData:
    """Read a .jsonl/.json (JSON Lines), .csv, .tsv, .parquet or .arrow file, or a folder of a
    Hugging Face export (FOLDER or FOLDER:SPLIT; see gtacore/readers.py), of labelled texts.

    on_unknown_label: "error" stops at the first label outside the label set;
    "skip" drops such rows and counts them in `.skipped`. filters: {field: value};
    only rows where every field has that value are read (a ClassLabel field by its
    name). splits: the splits a bare folder of splits tries, in order.
    Texts and labels are stripped of surrounding whitespace.
    """
    if on_unknown_label not in ("error", "skip"):
        raise ValueError(f"on_unknown_label must be 'error' or 'skip', got {on_unknown_label!r}")
    allowed = _label_list(labels, "labels")
    names = _label_list(label_names, "label_names")
    filters = dict(filters or {})
    rows = read_rows(path, (text_field, label_field, *filters), encoding, splits)
    exported = rows.class_names.get(label_field)
    if names is not None and exported is not None and names != exported:
        raise DataError(f"{path}: the label names {names} disagree with the export's ClassLabel names {exported} "
                        f"of field {label_field!r}; pass no label names (or another recipe)")
    names = names if names is not None else exported
    label_set = allowed if allowed is not None else names
    known = set(label_set) if label_set is not None else None

    examples, skipped, unmatched, seen = [], 0, 0, {}
    for where, row in rows.items:
        if not _matches(row, filters, rows.class_names, where, seen):
            unmatched += 1
            continue
        text = _text(row, text_field, where)
        label = _label(row, label_field, names, allowed, where)
        if known is not None and label not in known:
            if on_unknown_label == "skip":
                skipped += 1
                continue
            raise DataError(
                f"{where}: label {label!r} is not in the label set {label_set}; "
                "fix --labels, or pass --skip-unknown-labels to drop such rows"
            )
        examples.append(Example(text, label, where))

    if skipped:
        log.warning("%s: skipped %d rows with labels outside the label set", path, skipped)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({skipped} rows skipped: unknown labels)" if skipped else "")
                        + (_no_match(filters, seen, unmatched) if unmatched else ""))
    final = list(label_set) if label_set is not None else sorted({e.label for e in examples})
    return ClassificationData(examples, final, skipped, unmatched)


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


def _matches(row: dict, filters: dict[str, str], class_names: dict[str, list[str]], where: str,
             seen: dict[str, set[str]]) -> bool:
    """Whether every filtered field of `row` has its value (a ClassLabel index compared by its name);
    the values met are added to `seen`, for the error when nothing matches."""
    ok = True
    for field, wanted in filters.items():
        if field not in row:
            raise DataError(f"{where}: no field {field!r} to filter on; fields are {sorted(row)}")
        value, names = row[field], class_names.get(field, [])
        if isinstance(value, int) and 0 <= value < len(names):
            value = names[value]
        seen.setdefault(field, set()).add(str(value))
        ok = ok and str(value) == wanted
    return ok


def _no_match(filters: dict[str, str], seen: dict[str, set[str]], rows: int) -> str:
    """' (--filter ... matches none of N rows; FIELD has: a, b, ...)' for the fields that never matched."""
    values = [f"{field} has {', '.join(sorted(seen[field])[:12])}{', ...' if len(seen[field]) > 12 else ''}"
              for field, wanted in filters.items() if wanted not in seen.get(field, ())]
    given = ",".join(f"{k}={v}" for k, v in filters.items())
    return f" (--filter {given} matches none of {rows} rows" + ("; " + "; ".join(values) if values else "") + ")"


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
                "name the classes with --label-names NAME0,NAME1,... (index order) or a --recipe, or list "
                "it in --labels to use it as a name"
            )
    if isinstance(raw, int):
        if names is None:
            raise DataError(
                f"{where}: integer label {raw} but no label names; name the classes with "
                "--label-names NAME0,NAME1,... (index order) or a --recipe"
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
