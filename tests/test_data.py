"""Data loading, label naming, recipes, sampler and few-shot picking."""

import dataclasses
import json
import sys
from collections import Counter

import pytest

from gtacore.batches import BatchSampler
from gtacore.data import (
    RECIPES, ClassificationData, DataError, Example, apply_recipe, few_shot_examples, load_examples, split_examples,
)
from gtacore.run_data import read_label_file


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(tmp_path, rows, name="d.jsonl"):
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------
# Loading good files.


def test_jsonl_with_field_mapping_and_stripping(tmp_path):
    rows = [{"utt": "  wake me up  ", "scenario": " alarm "}, {"utt": "play jazz", "scenario": "music"}]
    path = jsonl(tmp_path, rows)
    data = load_examples(path, text_field="utt", label_field="scenario")
    assert data.examples == [Example("wake me up", "alarm", f"{path}:1"), Example("play jazz", "music", f"{path}:2")]
    assert data.labels == ["alarm", "music"] and data.skipped == 0


def test_inferred_labels_are_sorted_and_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "d.json", '{"text": "x", "label": "zeta"}\n\n{"text": "y", "label": "alpha"}\n')
    data = load_examples(path)
    assert data.labels == ["alpha", "zeta"]
    assert [e.source for e in data.examples] == [f"{path}:1", f"{path}:3"]


def test_csv_quoted_multiline_and_bom(tmp_path):
    content = '\ufeffid,sentence,cls\n1,"hello, world",pos\n2,"two\nlines",neg\n3,last,pos\n'
    path = write(tmp_path, "d.csv", content)
    data = load_examples(path, text_field="sentence", label_field="cls")
    expected = [("hello, world", "pos"), ("two\nlines", "neg"), ("last", "pos")]
    assert [(e.text, e.label) for e in data.examples] == expected
    # The record that spans lines 3-4 is reported at the line it starts on.
    assert [e.source.rsplit(":", 1)[1] for e in data.examples] == ["2", "3", "5"]


def test_tsv(tmp_path):
    path = write(tmp_path, "d.tsv", "text\tlabel\na, b\tx\nc\ty\n")
    data = load_examples(path, labels=["y", "x"])
    assert [(e.text, e.label) for e in data.examples] == [("a, b", "x"), ("c", "y")]
    assert data.labels == ["y", "x"]  # the given order is kept


def test_integer_labels_with_names(tmp_path):
    path = jsonl(tmp_path, [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    data = load_examples(path, label_names=["neg", "neu", "pos"])
    assert [e.label for e in data.examples] == ["pos", "neg"]
    assert data.labels == ["neg", "neu", "pos"]
    csv_path = write(tmp_path, "d.csv", "text,label\na,1\nb,neg\n")  # digit strings map; names pass through
    assert [e.label for e in load_examples(csv_path, label_names=["neg", "pos"]).examples] == ["pos", "neg"]


def test_digit_strings_listed_in_labels_are_names(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\ngreat,5\nbad,1\n")
    data = load_examples(path, labels=["1", "2", "3", "4", "5"])
    assert [e.label for e in data.examples] == ["5", "1"]


def test_skip_mode_counts(tmp_path):
    path = jsonl(tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "other"}, {"text": "c", "label": "y"},
                            {"text": "d", "label": "other"}])
    data = load_examples(path, labels=["x", "y"], on_unknown_label="skip")
    assert [e.text for e in data.examples] == ["a", "c"]
    assert data.skipped == 2


def test_read_label_file(tmp_path):
    assert read_label_file(write(tmp_path, "labels.txt", "b\n a \n\nc\n")) == ["b", "a", "c"]
    with pytest.raises(DataError, match=r"labels\.txt:3: duplicate label 'a'"):
        read_label_file(write(tmp_path, "labels.txt", "a\nb\na\n"))


# ---------------------------------------------------------------------------
# Bad inputs: each error names the file and the line (or column).


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("d.jsonl", "", {}, r"d\.jsonl: file is empty"),
        ("d.csv", "\n  \n", {}, r"d\.csv: file is empty"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', {}, r"d\.jsonl:2: malformed JSON"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', {}, r"d\.jsonl:2: expected a JSON object, got list"),
        ("d.json", '[{"text": "a", "label": "x"}]', {}, r"d\.json: this is one JSON array"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n', {},
         r"d\.jsonl:2: no field 'text'; fields are \['label', 'txt'\]"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n', {}, r"d\.jsonl:2: empty text"),
        ("d.jsonl", '{"text": null, "label": "y"}\n', {}, r"d\.jsonl:1: empty text"),
        ("d.jsonl", '{"text": "a", "label": null}\n', {}, r"d\.jsonl:1: empty label"),
        ("d.jsonl", '{"text": 5, "label": "x"}\n', {}, r"d\.jsonl:1: field 'text' must be a string, got int"),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, r"d\.jsonl:1: label must be a string or an integer"),
        ("d.csv", "text,category\na,x\n", {}, r"d\.csv:1: no column 'label'; the columns are \['text', 'category'\]"),
        ("d.tsv", "text\tlabel\na\tx\nb\t\n", {}, r"d\.tsv:3: empty label"),
        ("d.csv", "text,label\na,x\nb,c,y\n", {}, r"d\.csv:3: 3 fields but the header has 2"),
        ("d.csv", 'text,label\na,x\n"b,y\nc,z\n', {}, r"d\.csv:3: bad quoting \(unexpected end of data\)"),
        ("d.tsv", 'text\tlabel\n"Mr. Deeds" is bad\tx\n', {}, r"d\.tsv:2: bad quoting"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n', {"labels": ["x", "y"]},
         r"d\.jsonl:2: label 'z' is not in the label set \['x', 'y'\]"),
        ("d.jsonl", '{"text": "a", "label": 3}\n', {}, r"d\.jsonl:1: integer label 3 but no label names"),
        ("d.csv", "text,label\na,3\n", {}, r"d\.csv:2: label '3' looks like a class index"),
        ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n', {"label_names": ["p", "q"]},
         r"d\.jsonl:2: label index 5 is out of range for 2 label names"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n', {"labels": ["x", "x"]}, r"labels: duplicate labels \['x'\]"),
        ("d.xml", "<a/>", {}, r"d\.xml: unknown file type '\.xml'"),
        ("d.jsonl", '{"text": "a", "label": "x"}\n', {"labels": ["y"], "on_unknown_label": "skip"},
         r"d\.jsonl: no examples \(1 rows skipped"),
        ("d.csv", "text,label\n", {}, r"d\.csv: no examples"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, content, kwargs, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message):
        load_examples(path, **kwargs)


def test_non_utf8_names_line_and_offset(tmp_path):
    # Line 1 is 28 characters + "\n" = 29 bytes; 0xe9 follows the 13 bytes of '{"text": "caf' on line 2.
    path = write(tmp_path, "d.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: bytes b'\\xe9' are not valid utf-8 \(byte offset 42 in the file, "
                                        r"13 in the line\)"):
        load_examples(path)
    assert load_examples(path, encoding="latin-1").examples[1].text == "café"


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_unknown_label"):
        load_examples(tmp_path / "nope.jsonl", on_unknown_label="drop")


# ---------------------------------------------------------------------------
# Parquet.


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = write(tmp_path, "d.parquet", b"PAR1")
    with pytest.raises(DataError, match=r"d\.parquet: reading Parquet needs pyarrow.*pip install pyarrow"):
        load_examples(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 0], "label_text": ["q", "p"]}), path)
    data = load_examples(path, label_names=["p", "q"])
    assert [(e.text, e.label, e.source) for e in data.examples] == [("a", "q", f"{path}:1"), ("b", "p", f"{path}:2")]
    with pytest.raises(DataError, match=r"d\.parquet: no column 'sentence'; the columns are \['text', 'label', "):
        load_examples(path, text_field="sentence")
    with pytest.raises(DataError, match=r"d\.parquet:1: integer label 1 but no label names"):
        load_examples(path)
    bad = write(tmp_path, "bad.parquet", b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read as Parquet"):
        load_examples(bad)


# ---------------------------------------------------------------------------
# Recipes.


def test_recipes(tmp_path):
    assert set(RECIPES) == {"sst5", "dair_emotion", "massive", "bbc_news"}
    assert len(apply_recipe("sst5").label_names) == 5
    assert apply_recipe("dair_emotion").label_names == ("sadness", "joy", "love", "anger", "fear", "surprise")
    massive = apply_recipe("massive").label_names
    assert len(massive) == len(set(massive)) == 18
    assert apply_recipe("bbc_news").label_field == "label_text"
    with pytest.raises(DataError, match="recipe 'imdb'; known recipes: bbc_news, dair_emotion, massive, sst5"):
        apply_recipe("imdb")


@pytest.mark.parametrize(
    "recipe, row, label",
    [
        ("sst5", {"text": "meh", "label": 2, "label_text": "neutral"}, "neutral"),
        ("dair_emotion", {"text": "i feel scared", "label": 4}, "fear"),
        ("massive", {"utt": "wake me at 7", "scenario": 16}, "alarm"),  # HF Parquet export: an index
        ("massive", {"utt": "wake me at 7", "scenario": "alarm"}, "alarm"),  # raw release: a name
        ("bbc_news", {"text": "Shares fell", "label": 1, "label_text": "business"}, "business"),
    ],
)
def test_recipe_loads_public_export(tmp_path, recipe, row, label):
    data = load_examples(jsonl(tmp_path, [row]), **dataclasses.asdict(apply_recipe(recipe)))
    assert data.examples[0].label == label


# ---------------------------------------------------------------------------
# Sampler.


def take(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


def test_sampler_is_deterministic_and_epochs_are_permutations():
    a, b = BatchSampler(23, 4, seed=7), BatchSampler(23, 4, seed=7)
    assert a.steps_per_epoch == 5  # 23 // 4; the last 3 indices of each epoch are dropped
    batches = take(a, 10)
    assert batches == take(b, 10)
    for epoch in (batches[:5], batches[5:]):
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 20 and all(0 <= i < 23 for i in flat)
    assert batches[:5] != batches[5:]  # a fresh permutation each epoch
    assert take(BatchSampler(23, 4, seed=8), 5) != batches[:5]
    assert a.state_dict()["epoch"] == 2 and a.state_dict()["step"] == 0


def test_sampler_resume_equals_continuing():
    run = BatchSampler(50, 3, seed=1, rank=1, world_size=2)
    take(run, 11)  # into the second epoch (8 steps per epoch)
    state = run.state_dict()
    expected = take(run, 12)
    resumed = BatchSampler(50, 3, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert take(resumed, 12) == expected
    # The same global batch on a different world size resumes the same data.
    other = BatchSampler(50, 6, seed=1)
    other.load_state_dict(state)
    assert other.next_batch()[3:] == expected[0]
    with pytest.raises(DataError, match="seed=1 but this sampler has 2"):
        BatchSampler(50, 3, seed=2, rank=0, world_size=2).load_state_dict(state)


def test_ranks_are_disjoint_and_cover_the_global_batch():
    world = 4
    ranks = [BatchSampler(101, 5, seed=3, rank=r, world_size=world) for r in range(world)]
    single = BatchSampler(101, 5 * world, seed=3)
    for _ in range(12):
        parts = [s.next_batch() for s in ranks]
        assert all(len(p) == 5 for p in parts)
        assert len(set().union(*parts)) == 5 * world  # disjoint
        assert [i for p in parts for i in p] == single.next_batch()


def test_sampler_rejects_too_little_data_and_bad_settings():
    with pytest.raises(DataError, match=r"7 examples are fewer than one global batch \(4 per rank x 2 ranks = 8\)"):
        BatchSampler(7, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(100, 4, rank=2, world_size=2)


# ---------------------------------------------------------------------------
# Few-shot examples.


def make_data(counts):
    examples = [Example(f"{label}{i}", label, f"f:{n}") for n, (label, i) in
                enumerate((label, i) for label, c in counts.items() for i in range(c))]
    return ClassificationData(examples, list(counts))


def test_few_shot_rotates_labels_and_is_deterministic():
    data = make_data({"a": 5, "b": 1, "c": 3})
    shots = few_shot_examples(data, 3, seed=0)
    assert sorted(e.label for e in shots) == ["a", "b", "c"]  # one per label first
    assert few_shot_examples(data, 3, seed=0) == shots
    assert {tuple(few_shot_examples(data, 3, seed=s)) for s in range(10)} != {tuple(shots)}
    many = few_shot_examples(data, 7, seed=1)  # b runs out after one: a and c keep rotating
    assert Counter(e.label for e in many) == {"a": 3, "b": 1, "c": 3}
    assert len(set(many)) == 7
    with pytest.raises(DataError, match="cannot pick 10 few-shot examples from 9"):
        few_shot_examples(data, 10, seed=0)


def test_split_examples_removes_the_shots():
    data = make_data({"a": 4, "b": 4})
    shots, rest = split_examples(data, 2, seed=5)
    assert shots == few_shot_examples(data, 2, seed=5)
    assert len(rest.examples) == 6 and not set(shots) & set(rest.examples)
    assert rest.labels == ["a", "b"]
