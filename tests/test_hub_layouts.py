"""The folder layouts the Hub and `datasets` produce: split names come from file and folder names,
and no test row is ever read as a training row. Before, the Hub's Parquet export
(ROOT/data/train-....parquet beside ROOT/data/test-....parquet) was one split named "data", and
`--data ROOT:data`, as the error's hint said, trained on the test rows too."""

import pytest

from gtacore.data import DataError, load_examples
from test_hf_exports import EMOTION, hf_table, needs_pyarrow, run_data, save_to_disk, write_parquet

pytestmark = needs_pyarrow
TRAIN = [("what a lovely morning", 1), ("i feel so alone tonight", 0)]
TEST = [("that scared me", 4)]
VALIDATION = [("i adore him", 2)]


def texts(examples):
    return [e.text for e in examples]


def write_split(path, rows):
    return write_parquet(path, hf_table(EMOTION, rows))


@pytest.mark.parametrize("layout", [
    "data/{split}-00000-of-00001.parquet",  # the Hub's Parquet export and downloads
    "{split}/0000.parquet",  # one folder per split
    "default/{split}/0000.parquet",  # CONFIG/SPLIT (refs/convert/parquet)
    "{split}-00000-of-00001-4f1c2a.parquet",  # shards at the root, hashed
    "{split}.parquet",  # a split word as the name
    "{split}-part1.parquet",  # SPLIT-*.parquet at the root
    "{split}/part-00000-of-00001.parquet",  # shards of one split in its folder
    "emotion-{split}.parquet",  # the datasets cache's naming
])
def test_train_and_test_splits_stay_apart(tmp_path, layout):
    root = tmp_path / "export"
    for split, rows in (("train", TRAIN), ("test", TEST), ("validation", VALIDATION)):
        write_split(root / layout.format(split=split), rows)
    data = run_data("--data", str(root), "--eval-data", str(root))
    assert texts(data.train.examples) == [t for t, _ in TRAIN]
    assert texts(data.eval_examples) == [t for t, _ in TEST]
    assert texts(load_examples(f"{root}:validation").examples) == [t for t, _ in VALIDATION]


def test_the_old_hint_no_longer_merges_splits(tmp_path):
    root = tmp_path / "export"
    write_split(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    write_split(root / "data" / "test-00000-of-00001.parquet", TEST)
    with pytest.raises(DataError, match=r"export:data: no split 'data'; the splits are \['test', 'train'\] "
                                        r"\(pick one as .*export:SPLIT\)"):
        load_examples(f"{root}:data")


def test_save_to_disk_dataset_dict(tmp_path):
    root = tmp_path / "dict"
    (root / "dataset_dict.json").parent.mkdir(parents=True)
    (root / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    save_to_disk(root / "train", EMOTION, TRAIN, "train")
    save_to_disk(root / "test", EMOTION, TEST, "test")
    data = run_data("--data", str(root), "--eval-data", str(root))
    assert texts(data.train.examples) == [t for t, _ in TRAIN] and texts(data.eval_examples) == [t for t, _ in TEST]


def test_a_split_in_two_configurations_is_an_error_naming_both(tmp_path):
    root = tmp_path / "export"
    for config in ("en", "fr"):
        write_split(root / config / "train" / "0000.parquet", TRAIN)
    with pytest.raises(DataError, match=r"export: split 'train' is in both en/ and fr/"):
        load_examples(root)
    assert texts(load_examples(root / "fr").examples) == [t for t, _ in TRAIN]  # one config's folder


def test_files_that_mix_split_names_and_others_are_an_error(tmp_path):
    root = tmp_path / "mixed"
    write_split(root / "train.parquet", TRAIN)
    write_split(root / "extra_rows.parquet", TEST)
    with pytest.raises(DataError, match=r"some files name a split \(train\.parquet\) and others do not "
                                        r"\(extra_rows\.parquet\)"):
        load_examples(root)


def test_files_that_name_no_split_are_one_dataset(tmp_path):
    root = tmp_path / "plain"
    write_split(root / "part-a.parquet", TRAIN)
    write_split(root / "part-b.parquet", TEST)
    assert texts(load_examples(root).examples) == [t for t, _ in TRAIN + TEST]


def test_splits_that_share_a_word_stay_apart(tmp_path):
    """MNLI's validation_matched and validation_mismatched; the Hub's custom split names."""
    root = tmp_path / "mnli"
    write_split(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    write_split(root / "data" / "validation_matched-00000-of-00001.parquet", TEST)
    write_split(root / "data" / "validation_mismatched-00000-of-00001.parquet", VALIDATION)
    assert texts(load_examples(f"{root}:validation_mismatched").examples) == [t for t, _ in VALIDATION]
    custom = tmp_path / "custom"
    write_split(custom / "sft-00000-of-00001.parquet", TRAIN)
    write_split(custom / "prefs-00000-of-00001.parquet", TEST)
    with pytest.raises(DataError, match=r"no split 'train'; the splits are \['prefs', 'sft'\]"):
        load_examples(custom)
    assert texts(load_examples(f"{custom}:sft").examples) == [t for t, _ in TRAIN]
