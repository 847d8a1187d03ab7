"""The bundled demo dataset (gtacore/bundled/emotion_*.jsonl): well-formed, balanced, disjoint
splits, reproducible by data/make_dataset.py byte for byte, and not solvable by a
single keyword or a plain emotion-word lookup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gtacore" / "bundled"
SPLITS = {"train": DATA / "emotion_train.jsonl", "test": DATA / "emotion_test.jsonl"}
MIN_SIZE = {"train": 1000, "test": 300}
WORD = re.compile(r"[a-z][a-z'-]*")


def _load(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], 1):
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name}:{lineno}: not a JSON object"
        assert isinstance(row.get("text"), str) and row["text"].strip(), f"{path.name}:{lineno}: bad text"
        assert isinstance(row.get("label"), str), f"{path.name}:{lineno}: bad label"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: _load(path) for name, path in SPLITS.items()}


def _key(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def _words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def test_files_are_jsonl_with_text_and_label(splits):
    for name, path in SPLITS.items():
        raw = path.read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw, f"{path.name}: want LF line endings and a final newline"
        for row in splits[name]:
            assert set(row) <= {"text", "label", "kind"}, sorted(row)
            assert re.fullmatch(r"[a-z]+", row["label"]), f"label {row['label']!r} is not one lowercase word"
            assert 8 <= len(row["text"].split()) <= 60, row["text"]
            assert row["text"] == row["text"].strip()


def test_loads_with_gtacore_loader():
    from gtacore.data import load_examples

    for name, path in SPLITS.items():
        data = load_examples(path)
        assert len(data.examples) >= MIN_SIZE[name]
        assert data.labels == sorted({e.label for e in data.examples})


def test_sizes_classes_and_exact_balance(splits):
    labels = None
    for name, rows in splits.items():
        assert len(rows) >= MIN_SIZE[name], (name, len(rows))
        counts = Counter(r["label"] for r in rows)
        assert len(counts) >= 5, counts
        assert len(set(counts.values())) == 1, f"{name} is not balanced: {counts}"
        labels = labels or set(counts)
        assert set(counts) == labels, "train and test have different label sets"
        # The template kind must not give the label away: same kind mix in every class.
        mixes = {c: Counter(r.get("kind") for r in rows if r["label"] == c) for c in counts}
        assert len({tuple(sorted(m.items())) for m in mixes.values()}) == 1, mixes


def test_no_duplicates_and_no_overlap_between_splits(splits):
    keys = {name: [_key(r["text"]) for r in rows] for name, rows in splits.items()}
    for name, ks in keys.items():
        dups = [k for k, n in Counter(ks).items() if n > 1]
        assert not dups, f"{name}: duplicate texts (ignoring case and punctuation): {dups[:3]}"
    shared = set(keys["train"]) & set(keys["test"])
    assert not shared, f"texts in both splits: {sorted(shared)[:3]}"


def test_generator_reproduces_committed_files(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="12345")  # set order must not matter
    subprocess.run([sys.executable, str(ROOT / "data" / "make_dataset.py"), "--out-dir", str(tmp_path), "--quiet"],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    for name, path in SPLITS.items():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), (
            f"{path.name} differs from what data/make_dataset.py generates; rerun it and commit the result")


def _keyword_stats(rows):
    """(class, word) -> (precision, recall) of the rule 'word in text -> class'."""
    docs = [(_words(r["text"]), r["label"]) for r in rows]
    n_class = Counter(label for _, label in docs)
    df, df_class = Counter(), Counter()
    for words, label in docs:
        df.update(words)
        df_class.update((w, label) for w in words)
    return {(c, w): (hit / df[w], hit / n_class[c]) for (w, c), hit in df_class.items()}


def _f1(p, r):
    return 2 * p * r / (p + r)


def test_no_single_keyword_solves_a_class(splits):
    for name, rows in splits.items():
        stats = _keyword_stats(rows)
        # A keyword that finds half of a class at 90% precision would be a shortcut.
        shortcuts = {cw: pr for cw, pr in stats.items() if pr[0] >= 0.9 and pr[1] >= 0.5}
        assert not shortcuts, f"{name}: single-keyword shortcuts {shortcuts}"
        for c in {c for c, _ in stats}:
            best = max(((w, _f1(*pr)) for (cc, w), pr in stats.items() if cc == c), key=lambda x: x[1])
            assert best[1] < 0.6, f"{name}: the word {best[0]!r} alone finds class {c} with F1 {best[1]:.2f}"


def test_best_keyword_per_class_classifier_is_weak(splits):
    """Learn on train the best word per class (highest F1); on test, predict the class whose
    word appears (ties: the word with the higher train F1). Perfect would be 100%."""
    stats = _keyword_stats(splits["train"])
    rules = {}
    for (c, w), pr in sorted(stats.items()):
        if _f1(*pr) > rules.get(c, ("", -1.0))[1]:
            rules[c] = (w, _f1(*pr))
    ordered = sorted(rules.items(), key=lambda kv: -kv[1][1])
    right = 0
    for row in splits["test"]:
        words = _words(row["text"])
        guess = next((c for c, (w, _) in ordered if w in words), ordered[0][0])
        right += guess == row["label"]
    accuracy = right / len(splits["test"])
    assert accuracy < 0.5, f"one keyword per class reaches {accuracy:.0%} on test: {rules}"


# A plain emotion lexicon, written independently of the generator's word lists.
LEXICON = {
    "joy": "happy glad thrilled delighted overjoyed ecstatic pleased cheerful elated joy",
    "sadness": "sad unhappy heartbroken devastated crushed gutted miserable lonely sadness grief",
    "anger": "angry mad furious livid fuming annoyed irritated outraged seething anger",
    "fear": "scared afraid terrified frightened nervous worried anxious petrified panicky fear",
    "surprise": "surprised shocked stunned amazed astonished speechless gobsmacked startled surprise",
    "disgust": "disgusted gross revolted repulsed sickened nauseated queasy disgust",
}


def test_emotion_word_lookup_is_not_enough(splits):
    """Among texts that contain an emotion word, naming the class of the first, the last or
    the most frequent one must fail often: negation, contrast and reported speech are there
    for that. (On `plain` texts alone these rules are right every time.)"""
    lexicon = {w: c for c, words in LEXICON.items() for w in words.split()}
    for name, rows in splits.items():
        right, with_hits = Counter(), 0
        for row in rows:
            hits = [lexicon[w] for w in WORD.findall(row["text"].lower()) if w in lexicon]
            if hits:
                with_hits += 1
                right["first"] += hits[0] == row["label"]
                right["last"] += hits[-1] == row["label"]
                right["most"] += Counter(hits).most_common(1)[0][0] == row["label"]
        assert with_hits >= len(rows) / 3, f"{name}: the lexicon matches only {with_hits} texts"
        for rule, n in right.items():
            assert n / with_hits < 0.7, f"{name}: the {rule} emotion word gives the label in {n / with_hits:.0%}"
        tricky = sum(r.get("kind") in ("negation", "contrast", "mixed", "reported", "irony") for r in rows)
        assert tricky / len(rows) >= 0.3, f"{name}: only {tricky} examples of negation/contrast/mixed/reported/irony"
