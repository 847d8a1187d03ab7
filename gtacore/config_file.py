"""Configuration files: a run's config.json (replayed by `--config RUN/config.json`), or a .toml /
.yaml file with the same sections as `python train.py --help`'s groups."""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints



def read_sections(path: str | Path, classes: dict[str, type]) -> dict[str, Any]:
    """A config file as {"section.name": value}, its sections named by `classes` (section name ->
    dataclass). An unknown section or key, or a value of the wrong type, is an error naming it
    and the file."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise ValueError("YAML config files need PyYAML: pip install pyyaml (or use .json / .toml)") from e
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as a config file: {e}") from e
    out = {}
    for section, values in (data or {}).items():
        if section not in classes or not isinstance(values, dict):
            raise ValueError(f"{path}: unknown section {section!r} (sections: {', '.join(classes)})"
                             f"{_did_you_mean(section, None, classes)}")
        hints = get_type_hints(classes[section])
        for key, value in values.items():
            if key not in hints:
                raise ValueError(f"{path}: unknown key {section}.{key}{_did_you_mean(key, section, classes)}")
            want = base_type(hints[key])
            if want is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = _float(value, value)
            if value is not None and not (isinstance(value, want) or (want is float and type(value) is int)):
                raise ValueError(f"{path}: {section}.{key} must be {want.__name__}, got {value!r}")
            out[f"{section}.{key}"] = float(value) if want is float and value is not None else value
    return out



def base_type(tp):
    """`int | None` -> int."""
    if get_origin(tp) is not None and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _float(text: str, otherwise):
    try:
        return float(text)
    except ValueError:
        return otherwise


def _did_you_mean(key: str, section: str | None, classes: dict[str, type]) -> str:
    """'; did you mean loss.lr?' -- the closest known key, in any section (keys do move), or section."""
    known = list(classes) if section is None else [f"{s}.{k}" for s, cls in classes.items() for k in get_type_hints(cls)]
    names = {name.rpartition(".")[2]: name for name in known}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f"; did you mean {names[close[0]]}?" if close else ""
