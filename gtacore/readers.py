"""File readers: rows as ("file:line", row dict) from JSONL, CSV/TSV, Parquet or Arrow files and from
Hugging Face dataset exports, and label lists, with errors naming the file and line
(gtacore/data.py turns rows into examples).

A data path is a file or a folder of Parquet/Arrow files, as the Hub and `datasets` write them.
Split names come from the file and folder names, and differently named splits are never merged:

- files named by split: `SPLIT-00000-of-00002[-HASH].parquet` (the Hub's shards), or a split word
  as a part of the name (`train.parquet`, `test-0001.parquet`, `emotion-train.arrow`), at the root
  or under `data/` (the Hub's Parquet export: `ROOT/data/train-00000-of-00001.parquet`);
- one folder per split: `SPLIT/0000.parquet`, or `CONFIG/SPLIT/0000.parquet` (the Hub's
  refs/convert/parquet branch), or `save_to_disk` of a DatasetDict (`dataset_dict.json`, and per
  split a folder with `state.json`, `dataset_info.json` and `data-00000-of-00001.arrow`, an Arrow
  IPC stream);
- one dataset: `save_to_disk` of a Dataset (the files its `state.json` lists), or `.parquet` /
  `.arrow` files none of which names a split, read in name order.

`FOLDER:SPLIT` picks a split; a bare folder of splits gives the first of the caller's defaults it has.
A split found in two places (two configs) is an error that names them: pick one folder.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple


class DataError(ValueError):
    """A bad data file, label list or sampler setting; the message says where."""


class Rows(NamedTuple):
    items: Iterator[tuple[str, dict]]  # ("file:line" or "file:row", row)
    class_names: dict[str, list[str]]  # column -> the names of its ClassLabel feature (Hugging Face exports)


COLUMNAR = (".parquet", ".arrow")
SHARD = re.compile(r"(.+?)-\d+-of-\d+(?:-[0-9a-f]+)?")  # NAME-00000-of-00002[-HASH]: the Hub's shard names
# A file names a split by a split word (the Hub's), as a whole part of its name, with any "_part"s
# after it: train.parquet, test-0001.parquet, emotion-train.arrow (the datasets cache),
# validation_matched-00000-of-00001.parquet ("validation_matched"). Names are lowercased.
SPLIT_WORD = re.compile(r"(?:^|[-_.])((?:train|training|test|testing|validation|valid|val|dev|eval|evaluation)"
                        r"(?:_[a-z0-9]+)*)(?=$|[-.])", re.IGNORECASE)


def read_rows(path: str | Path, fields: Sequence[str], encoding: str, splits: Sequence[str]) -> Rows:
    """The rows of `path` (a file, FOLDER or FOLDER:SPLIT; `splits`: the splits a bare FOLDER
    tries, in order); `fields` must exist."""
    files = data_files(str(path), splits)
    suffix = files[0].suffix.lower()
    if suffix in COLUMNAR:
        return _columnar_rows(files, fields)
    path = files[0]
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, decode_file(path, encoding))
    elif suffix in (".csv", ".tsv"):
        rows = _delimited_rows(path, decode_file(path, encoding), "," if suffix == ".csv" else "\t", fields)
    else:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json, .csv, .tsv, .parquet "
                        "or .arrow, or a folder of .parquet/.arrow files")
    return Rows(((f"{path}:{lineno}", row) for lineno, row in rows), {})


def data_files(spec: str, splits: Sequence[str]) -> list[Path]:
    """The files `spec` names: [the file], a folder's one dataset, or the files of a split."""
    path, split = Path(spec), None
    head, colon, tail = spec.rpartition(":")
    if head and colon and not path.exists() and Path(head).is_dir():
        path, split = Path(head), tail
    if not path.is_dir():
        return [path]
    found = _splits(path)
    if not found:
        raise DataError(f"{path}: no .parquet or .arrow files in this folder or its subfolders")
    if list(found) == [""]:
        if split:
            raise DataError(f"{spec}: {path} holds one dataset, not splits; drop ':{split}'")
        return found[""]
    wanted = [split] if split else list(splits)
    for name in wanted:
        if name in found:
            return found[name]
    raise DataError(f"{spec}: no split {' or '.join(map(repr, wanted))}; the splits are {sorted(found)} "
                    f"(pick one as {path}:SPLIT)")


def _splits(folder: Path) -> dict[str, list[Path]]:
    """A folder's data files by split; a folder holding one dataset gives {"": files}."""
    files = _files(folder)
    if files:
        return _splits_by_name(folder, files)
    found: dict[str, list[Path]] = {}
    where: dict[str, Path] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        inner = _splits(sub)
        # A subfolder holding one dataset is a split named by the folder (train/0000.parquet); one
        # holding named splits passes them up (data/train-....parquet, CONFIG/SPLIT/...).
        for name, split_files in ({sub.name: inner[""]} if list(inner) == [""] else inner).items():
            if name in found:
                raise DataError(f"{folder}: split {name!r} is in both {where[name].relative_to(folder)}/ and "
                                f"{sub.relative_to(folder)}/ (two configurations?); pass the folder of the one "
                                "you mean")
            found[name], where[name] = split_files, sub
    return found


def _splits_by_name(folder: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Files in one folder by the split their names give: a split word, else differing shard
    names (NAME-00000-of-00001: the Hub's custom splits); {"": files} when none names a split."""
    if (folder / "state.json").is_file():
        return {"": files}
    names = [_split_name(file.stem) for file in files]
    if not any(names):
        shards = [SHARD.fullmatch(file.stem) for file in files]
        if not all(shards) or len({m[1] for m in shards}) == 1:  # one dataset, maybe in shards
            return {"": files}
        names = [m[1] for m in shards]
    elif not all(names):
        named, other = (next(f.name for f, n in zip(files, names) if bool(n) == want) for want in (True, False))
        raise DataError(f"{folder}: some files name a split ({named}) and others do not ({other}), so which rows "
                        "are training rows is unclear; move them into folders of their own")
    found: dict[str, list[Path]] = {}
    for name, file in zip(names, files):
        found.setdefault(name, []).append(file)
    return found


def _split_name(stem: str) -> str | None:
    shard = SHARD.fullmatch(stem)
    word = SPLIT_WORD.search(shard[1] if shard else stem)
    return word[1].lower() if word else None


def _files(folder: Path) -> list[Path]:
    """The data files directly in `folder`: those a save_to_disk `state.json` lists, else every .parquet/.arrow file."""
    state = folder / "state.json"
    if not state.is_file():
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in COLUMNAR and p.is_file())
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in saved["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a save_to_disk state file ({type(e).__name__}: {e})") from None
    if saved.get("_indices_data_files"):
        # Older datasets versions saved a shuffle/select/filter as an index over the unchanged rows.
        raise DataError(f"{state}: this save_to_disk folder keeps an indices mapping (an older datasets version), "
                        "which would be read as the unselected rows; re-save it with a current datasets, or export "
                        "Parquet")
    return files


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


def _delimited_rows(path: Path, text: str, delimiter: str, fields: Sequence[str]) -> Iterator[tuple[int, dict]]:
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


def _columnar_rows(files: list[Path], fields: Sequence[str]) -> Rows:
    """Parquet or Arrow files, one dataset's shards in order: rows of the columns `fields` names."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        kind = "Parquet" if files[0].suffix.lower() == ".parquet" else "Arrow"
        raise DataError(f"{files[0]}: reading {kind} needs pyarrow, which is not installed: "
                        "pip install 'gtacore[parquet]' (or pip install pyarrow)") from None
    columns = list(dict.fromkeys(fields))
    read = [(file, *_read_columns(file, columns)) for file in files]  # (file, schema, table)
    if not any(table.num_rows for _, _, table in read):
        raise DataError(f"{files[0]}: file is empty" if len(files) == 1 else f"{files[0].parent}: all {len(files)} files are empty")
    rows = ((f"{file}:{i}", row) for file, _, table in read for i, row in enumerate(table.to_pylist(), 1))
    return Rows(rows, _class_names(read[0][1], files[0]))


def _read_columns(file: Path, columns: list[str]):
    """(schema, table of `columns`) of a Parquet or Arrow file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = file.suffix.lower() == ".parquet"
    try:
        stream = None if parquet else _arrow_stream(pa, file)
        schema = pq.read_schema(file) if parquet else stream.schema
        for name in columns:
            if name not in schema.names:
                raise DataError(f"{file}: no column {name!r}; the columns are {schema.names}")
        return schema, pq.read_table(file, columns=columns) if parquet else stream.read_all().select(columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: cannot read as {'Parquet' if parquet else 'Arrow'}: {e}") from None


def _arrow_stream(pa, file: Path):
    """A reader of an Arrow IPC stream (what `datasets` writes), or of the IPC file format (Feather v2)."""
    source = pa.memory_map(str(file))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def _class_names(schema, file: Path) -> dict[str, list[str]]:
    """Column -> class names of its ClassLabel feature. `datasets` stores the features in the schema
    metadata ({"info": {"features": {column: {"names": [...], "_type": "ClassLabel"}, ...}}} under
    the key `huggingface`); save_to_disk also writes them to dataset_info.json (key "features")."""
    metadata, info = (schema.metadata or {}).get(b"huggingface"), file.parent / "dataset_info.json"
    try:
        if metadata:
            features = json.loads(metadata)["info"]["features"]
        elif info.is_file():
            features = json.loads(info.read_text(encoding="utf-8"))["features"]
        else:
            return {}
        return {name: list(feature["names"]) for name, feature in (features or {}).items()
                if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        where = file if metadata else info
        raise DataError(f"{where}: malformed Hugging Face features ({type(e).__name__}: {e})") from None
