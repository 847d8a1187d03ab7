"""File readers: (file line, row dict) from JSONL, CSV/TSV or Parquet, and label lists, with errors
naming the file and line (gtacore/data.py turns rows into examples)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """A bad data file, label list or sampler setting; the message says where."""


def read_rows(path: Path, fields: tuple[str, str], encoding: str) -> Iterator[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, fields)
    if suffix in (".jsonl", ".json"):
        return _jsonl_rows(path, decode_file(path, encoding))
    if suffix in (".csv", ".tsv"):
        return _delimited_rows(path, decode_file(path, encoding), "," if suffix == ".csv" else "\t", fields)
    raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json, .csv, .tsv or .parquet")


def decode_file(path: Path, encoding: str) -> str:
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
