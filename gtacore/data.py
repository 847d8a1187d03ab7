"""Labelled texts: load them from JSONL/CSV/TSV/Parquet, name their labels, and
cut them into deterministic, resumable, per-rank batches.

Every bad input raises `DataError` naming the file and the line (the 1-based
file line for JSONL/CSV/TSV, the 1-based row for Parquet): a trainer that dies
on row 80,000 with a bare KeyError wastes the GPU hour before it.

Label set, in order of precedence: `labels` (the allowed set, order kept), else
`label_names` (index -> name), else the sorted unique labels found in the data.
Integer labels (and digit strings, when `label_names` is given) are indices into
`label_names`; other strings are label names.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_INDEX = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts '²' and Devanagari digits


class DataError(ValueError):
    """A bad data file, label list or sampler setting; the message says where."""


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


def read_label_file(path: str | Path) -> list[str]:
    """One label per line, in order; blank lines are ignored."""
    path = Path(path)
    lines = [(i, line.strip()) for i, line in enumerate(_decode(path, "utf-8").split("\n"), 1)]
    labels, seen = [], set()
    for lineno, label in lines:
        if not label:
            continue
        if label in seen:
            raise DataError(f"{path}:{lineno}: duplicate label {label!r}")
        seen.add(label)
        labels.append(label)
    return labels


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
    for lineno, row in _rows(path, (text_field, label_field), encoding):
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


def _rows(path: Path, fields: tuple[str, str], encoding: str) -> Iterator[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, fields)
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, _decode(path, encoding))
    if suffix in (".csv", ".tsv"):
        return _delimited_rows(path, _decode(path, encoding), "," if suffix == ".csv" else "\t", fields)
    raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json, .csv, .tsv or .parquet")


def _decode(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{lineno}: bytes {data[e.start:e.end]!r} are not valid "
            f"{encoding} (byte offset {e.start} in the file, {e.start - line_start} in the line); "
            "re-save the file as UTF-8 or pass its encoding"
        ) from None
    # Excel and Notepad write a byte-order mark, which would otherwise glue
    # itself onto the first column name.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    if text.lstrip().startswith("["):
        raise DataError(f"{path}: this is one JSON array; expected JSON Lines (one object per line)")
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 or \x85,
    # which splitlines() would treat as line breaks.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def _delimited_rows(path: Path, text: str, delimiter: str, fields: tuple[str, str]) -> Iterator[tuple[int, dict]]:
    # strict: a stray quote fails loudly at its line instead of silently
    # swallowing the rest of the file into one field (quoting as pandas writes it).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        header = [name.strip() for name in next(reader)]
        for name in fields:
            if name not in header:
                raise DataError(f"{path}:1: no column {name!r}; the columns are {header}")
        # A quoted field may span lines: a row starts one line after the last one ended.
        start = reader.line_num + 1
        for row in reader:
            lineno, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{lineno}: {len(row)} fields but the header has {len(header)} "
                    f"(an unquoted {delimiter!r} in a text?)"
                )
            yield lineno, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(
            f"{path}:{start}: bad quoting ({e}); a field that starts with a quote must end with one, "
            "and quotes inside it are doubled"
        ) from None


def _parquet_rows(path: Path, fields: tuple[str, str]) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed: pip install pyarrow") from None
    try:
        columns = pq.read_schema(path).names
        for name in fields:
            if name not in columns:
                raise DataError(f"{path}: no column {name!r}; the columns are {columns}")
        table = pq.read_table(path, columns=list(dict.fromkeys(fields)))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: file is empty")
    yield from enumerate(table.to_pylist(), 1)


# ---------------------------------------------------------------------------
# Batches and few-shot examples.
