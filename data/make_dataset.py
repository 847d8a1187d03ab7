#!/usr/bin/env python3
"""Generate gtacore's bundled demo dataset: the emotion in a short first-person message.

    python data/make_dataset.py            # writes gtacore/bundled/emotion_train.jsonl and emotion_test.jsonl

Six classes (joy, sadness, anger, fear, surprise, disgust), balanced exactly per
split. Each example is built from a template of one "kind":

  plain     the emotion is named:            "I'm thrilled because I passed my driving test."
  implicit  no emotion word, only what happened and how the writer reacts
  negation  another class's word, negated:   "I'm not angry, just gutted. ..."
  contrast  an expectation of another class, overturned by how it went
  mixed     two emotions; "mostly" / "now" / "above all" decides which
  reported  someone else's emotion or opinion vs. the writer's own
  irony     light sarcasm or understatement: "Oh great, ... Just perfect."

The label is always the emotion the writer ends up feeling most. Every JSONL line
is {"text": ..., "label": ..., "kind": ...}; loaders read text and label and
ignore kind. Situations, reactions, events and outcomes are split between train
and test (see fragments.py), so test texts describe situations never seen in
training. Python standard library only; the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parent / "gtacore" / "bundled"
sys.path.insert(0, str(HERE))
import fragments as F  # noqa: E402

LABELS = F.LABELS
# Share of each kind, per class and split (identical for every class, so kind says nothing about label).
KINDS = {"plain": 22, "implicit": 20, "negation": 16, "contrast": 14, "mixed": 12, "reported": 10, "irony": 6}
NEGATIVE = ("sadness", "anger", "fear", "disgust")
TRICKY = ("negation", "contrast", "mixed", "reported", "irony")
MIN_WORDS, MAX_WORDS = 8, 60
SLOT = re.compile(r"\{(\w+)\}")
TOKEN = re.compile(r"[a-z][a-z'-]*")


def split_part(items, split):
    """Every 4th item goes to test, the rest to train."""
    return [x for i, x in enumerate(items) if (i % 4 == 3) == (split == "test")]


def pools(split):
    per_class = {name: {c: split_part(table[c], split) for c in LABELS}
                 for name, table in (("sit", F.SITUATIONS), ("react", F.REACTIONS), ("out", F.OUTCOMES))}
    per_class["events"] = split_part(F.EVENTS, split)
    return per_class


def feel_word(rng, c):
    """An emotion word of class c with a fitting intensifier: ("so ", "annoyed")."""
    if rng.random() < 0.5:
        return rng.choice(F.MILD_INT), rng.choice(F.FEEL[c]["mild"])
    return rng.choice(F.STRONG_INT), rng.choice(F.FEEL[c]["strong"])


def draw(name, rng, P, gold, other, cache):
    if name == "S":
        return rng.choice(P["sit"][gold])
    if name == "S2":
        return rng.choice(P["sit"][other])
    if name in ("R", "R2"):
        return rng.choice([r for r in P["react"][gold] if r != cache.get("R")])
    if name == "W":
        return "".join(feel_word(rng, gold))
    if name == "w":
        return feel_word(rng, gold)[1]
    if name == "O":
        return rng.choice(F.COMMON[other])
    if name == "J":
        return rng.choice(F.COMMON["joy"])
    if name == "n":
        return rng.choice(F.NOUN[other])
    if name == "E":
        return rng.choice(P["events"])
    if name == "X":
        return rng.choice(P["out"][gold])
    if name == "EXP":
        return rng.choice(F.EXPECT[other])
    if name in ("P", "PO"):
        person, pronoun = rng.choice(F.PERSONS)
        cache["P"], cache["PO"] = person, pronoun
        return cache[name]
    if name == "H":
        return rng.choice(F.HEDGES)
    if name == "IAM":
        return rng.choice(F.IAM)
    raise KeyError(f"unknown template slot {{{name}}}")


def sentence_case(text):
    text = text[0].upper() + text[1:]
    return re.sub(r"([.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def restyle(rng, text, kind):
    """Surface variety: an opener or closer, ! or ..., and texting-style lower case."""
    r = rng.random()
    if r < 0.18 and kind != "irony" and not text.startswith(("Honestly", "Well", "So ")):
        opener = rng.choice(F.OPENERS)
        keep = text.startswith(("I ", "I'")) or text[0] == '"'
        text = opener + (text if keep else text[0].lower() + text[1:])
    elif r < 0.32:
        text = text + " " + rng.choice(F.CLOSERS)
    r = rng.random()
    if text.endswith(".") and not text.endswith("..."):
        if r < 0.12:
            text = text[:-1] + "!"
        elif r < 0.18:
            text = text[:-1] + "..."
    if rng.random() < 0.08:
        text = text.lower().rstrip(".")
    return text


def make_example(rng, P, gold, kind):
    choices = [t for t in F.TEMPLATES[kind] if t[0] in ("all", gold) or (t[0] == "negative" and gold in NEGATIVE)]
    _, other_mode, template = rng.choice(choices)
    other = None
    if other_mode == "compat":
        other = rng.choice(F.COMPAT[gold])
    elif other_mode in ("any", "expect"):
        other = rng.choice([c for c in (LABELS if other_mode == "any" else F.EXPECTABLE) if c != gold])
    cache = {}

    def fill(m):
        name = m.group(1)
        if name not in cache:
            cache[name] = draw(name, rng, P, gold, other, cache)
        return cache[name]

    text = sentence_case(SLOT.sub(fill, template))
    return restyle(rng, text, kind)


def norm_key(text):
    return " ".join(TOKEN.findall(text.lower()))


def kind_counts(per_class):
    """Split per_class over KINDS by largest remainder, so the counts sum exactly."""
    total = sum(KINDS.values())
    raw = {k: per_class * w / total for k, w in KINDS.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: per_class - sum(counts.values())]:
        counts[k] += 1
    return counts


def generate_split(rng, split, per_class, seen):
    P, rows = pools(split), []
    for gold in LABELS:
        for kind, n in kind_counts(per_class).items():
            made, tries = 0, 0
            while made < n:
                tries += 1
                if tries > 200 * n + 1000:
                    raise RuntimeError(f"{split}/{gold}/{kind}: could not make {n} distinct texts")
                text = make_example(rng, P, gold, kind)
                key = norm_key(text)
                if not MIN_WORDS <= len(text.split()) <= MAX_WORDS or key in seen or text.lower().count("honestly") > 1:
                    continue
                seen.add(key)
                rows.append({"text": text, "label": gold, "kind": kind})
                made += 1
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------- stats


def lexicon_baseline(rows):
    """How far naming the class of an emotion word in the text gets: the first word, the
    last word, and the last word among texts that name two or more classes."""
    lexicon = sorted(((w, c) for c in LABELS for tier in F.FEEL[c].values() for w in tier), key=lambda x: -len(x[0]))
    right, multi, multi_right = Counter(), 0, 0
    for row in rows:
        text, hits = " " + norm_key(row["text"]) + " ", []
        for w, c in lexicon:
            for m in re.finditer(" " + re.escape(w) + " ", text):
                if not any(s <= m.start() < e for s, e, _ in hits):
                    hits.append((m.start(), m.end(), c))
        classes = [c for _, _, c in sorted(hits)]
        right["first"] += bool(classes) and classes[0] == row["label"]
        right["last"] += bool(classes) and classes[-1] == row["label"]
        if len(set(classes)) > 1:
            multi, multi_right = multi + 1, multi_right + (classes[-1] == row["label"])
    return right["first"] / len(rows), right["last"] / len(rows), multi, multi_right / max(multi, 1)


def best_keywords(rows):
    """Per class, the single word with the highest F1 as a 'this word -> this class' rule."""
    docs = [(set(TOKEN.findall(r["text"].lower())), r["label"]) for r in rows]
    df, df_c, n_c = Counter(), Counter(), Counter(label for _, label in docs)
    for words, label in docs:
        df.update(words)
        df_c.update((w, label) for w in words)
    best = {}
    for (w, c), hit in sorted(df_c.items()):
        prec, rec = hit / df[w], hit / n_c[c]
        f1 = 2 * prec * rec / (prec + rec)
        if f1 > best.get(c, ("", 0, 0, -1))[3]:
            best[c] = (w, prec, rec, f1)
    return best


def bag_of_words_baseline(train, test):
    """Test accuracy of multinomial naive Bayes on words, trained on train: what surface vocabulary buys."""
    counts = {c: Counter() for c in LABELS}
    for r in train:
        counts[r["label"]].update(TOKEN.findall(r["text"].lower()))
    vocab = len(set().union(*counts.values()))
    totals = {c: sum(counts[c].values()) + vocab for c in LABELS}

    def score(c, words):
        return sum(math.log((counts[c][w] + 1) / totals[c]) for w in words)

    right = 0
    for r in test:
        words = TOKEN.findall(r["text"].lower())
        right += max(LABELS, key=lambda c: score(c, words)) == r["label"]
    return right / len(test)


def print_stats(name, rows):
    n = len(rows)
    lengths = sorted(len(r["text"].split()) for r in rows)
    kinds = Counter(r["kind"] for r in rows)
    print(f"{name}: {n} examples, {len(LABELS)} classes x {n // len(LABELS)}; "
          f"words min {lengths[0]} / median {lengths[n // 2]} / max {lengths[-1]}")
    print("  kinds: " + ", ".join(f"{k} {kinds[k]} ({kinds[k] / n:.0%})" for k in KINDS))
    tricky = sum(kinds[k] for k in TRICKY)
    print(f"  tricky (negation/contrast/mixed/reported/irony): {tricky} ({tricky / n:.0%}); "
          f"no emotion word at all (implicit): {kinds['implicit'] / n:.0%}")
    first, last, multi, multi_last = lexicon_baseline(rows)
    print(f"  emotion-word lookup: first word {first:.1%}, last word {last:.1%} (chance {1 / len(LABELS):.1%}); "
          f"{multi} texts name 2+ emotions, the last one is the label in {multi_last:.0%}")
    best = best_keywords(rows)
    for c in LABELS:
        w, prec, rec, _ = best[c]
        print(f"  best keyword for {c:8s}: {w!r:14s} precision {prec:.0%}, recall {rec:.0%}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20240607, help="random seed (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=BUNDLED, help="output folder (default: gtacore/bundled/, where the package ships them)")
    ap.add_argument("--name", default="emotion", help="file prefix: NAME_train.jsonl, NAME_test.jsonl")
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=60)
    ap.add_argument("--quiet", action="store_true", help="do not print statistics")
    args = ap.parse_args(argv)

    rng, seen = random.Random(args.seed), set()
    splits = {"test": generate_split(rng, "test", args.test_per_class, seen),
              "train": generate_split(rng, "train", args.train_per_class, seen)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        path = args.out_dir / f"{args.name}_{split}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in splits[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not args.quiet:
            print(f"wrote {path}")
            print_stats(split, splits[split])
    if not args.quiet:
        print(f"bag-of-words naive Bayes, trained on train: {bag_of_words_baseline(splits['train'], splits['test']):.1%} on test")


if __name__ == "__main__":
    main()
