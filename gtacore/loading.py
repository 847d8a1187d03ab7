"""From command-line data options to examples, the label set and the worked examples."""

from __future__ import annotations

from pathlib import Path

from .data import ClassificationData, DataError, Example, apply_recipe, load_examples, read_label_file
from .sampling import few_shot_examples


def parse_labels(labels: str | None) -> list[str] | None:
    """`a,b,c` or the path of a file with one label per line."""
    if labels is None:
        return None
    if Path(labels).is_file():
        return read_label_file(labels)
    return [x.strip() for x in labels.split(",") if x.strip()]


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
