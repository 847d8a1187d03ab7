"""Hugging Face dataset exports read without the `datasets` package: the layouts the Hub and
`save_to_disk` write, for the paper's four datasets, through the loader train.py calls.

The exports are written here as `datasets` writes them: the features (`Features.to_dict()`) as
JSON under the schema metadata key `huggingface` ({"info": {"features": ...}}), Arrow files as IPC
streams, and save_to_disk's state.json, dataset_info.json and dataset_dict.json beside them.
"""

import json
import sys

import pytest

from gtacore.config import parse_config
from gtacore.data import DataError, load_examples
from gtacore.run_data import BUNDLED_TRAIN, load_run_data

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed (pip install 'gtacore[parquet]')")

STRING, INT64 = {"dtype": "string", "id": None, "_type": "Value"}, {"dtype": "int64", "id": None, "_type": "Value"}


def class_label(names):
    return {"names": list(names), "id": None, "_type": "ClassLabel"}


def hf_table(features: dict, rows: list[tuple]):
    """A table with `datasets`' schema metadata; ClassLabel columns hold int64 indices."""
    columns = list(zip(*rows))
    arrays = {name: pa.array(list(values), pa.string() if feature.get("dtype") == "string" else pa.int64())
              for (name, feature), values in zip(features.items(), columns)}
    return pa.table(arrays).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def write_parquet(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_arrow(path, table):
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def save_to_disk(folder, features, rows, split, metadata=True):
    """Dataset.save_to_disk: one Arrow shard, dataset_info.json and state.json."""
    table = hf_table(features, rows)
    write_arrow(folder / "data-00000-of-00001.arrow", table if metadata else table.replace_schema_metadata(None))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}))
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "5d7a1c0e2b3f4a69",
         "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
         "_split": split}))
    return folder


def run_data(*argv):
    """The data of `train.py ARGV` (parsed by its flag parser, loaded by its loader)."""
    return load_run_data(parse_config([*argv, "--device", "cpu"]), say=lambda *_: None)


def pairs(examples):
    return [(e.text, e.label) for e in examples]


# ---------------------------------------------------------------------------
# SST-5 (SetFit/sst5): text, label (an int64 Value, not a ClassLabel), label_text. The Hub's
# refs/convert/parquet layout: CONFIG/SPLIT/0000.parquet.

SST5 = {"text": STRING, "label": INT64, "label_text": STRING}
SST5_NAMES = ["very negative", "negative", "neutral", "positive", "very positive"]


def sst5_rows(*labels):
    return [(f"review {i} rated {y}", y, SST5_NAMES[y]) for i, y in enumerate(labels)]


@needs_pyarrow
def test_sst5_convert_layout(tmp_path):
    root = tmp_path / "sst5" / "default"
    for split, labels in [("train", (4, 0, 2)), ("validation", (1,)), ("test", (3, 2))]:
        write_parquet(root / split / "0000.parquet", hf_table(SST5, sst5_rows(*labels)))
    data = run_data("--data", str(root), "--eval-data", str(root), "--recipe", "sst5")
    assert pairs(data.train.examples) == [(t, SST5_NAMES[y]) for t, y, _ in sst5_rows(4, 0, 2)]
    assert data.train.examples[0].source == f"{root / 'train' / '0000.parquet'}:1"
    assert data.labels == SST5_NAMES
    assert pairs(data.eval_examples) == [(t, SST5_NAMES[y]) for t, y, _ in sst5_rows(3, 2)]  # the test split
    valid = run_data("--data", str(root), "--eval-data", f"{root}:validation", "--recipe", "sst5")
    assert pairs(valid.eval_examples) == [("review 0 rated 1", "negative")]
    with pytest.raises(DataError, match=r"integer label 4 but no label names"):  # a Value, not a ClassLabel
        run_data("--data", str(root))


# ---------------------------------------------------------------------------
# Emotion (dair-ai/emotion): text, label (ClassLabel). The main branch's Parquet files:
# split/SPLIT-00000-of-00001.parquet.

EMOTION = {"text": STRING, "label": class_label(["sadness", "joy", "love", "anger", "fear", "surprise"])}


@needs_pyarrow
def test_emotion_split_named_shards_and_class_label_names(tmp_path):
    folder = tmp_path / "emotion" / "split"
    write_parquet(folder / "train-00000-of-00001.parquet",
                  hf_table(EMOTION, [("i feel so alone tonight", 0), ("what a lovely morning", 1), ("i adore him", 2)]))
    write_parquet(folder / "validation-00000-of-00001.parquet", hf_table(EMOTION, [("that scared me", 4)]))
    names = EMOTION["label"]["names"]
    for recipe in ([], ["--recipe", "dair_emotion"]):
        data = run_data("--data", str(folder), "--eval-data", str(folder), *recipe)
        assert pairs(data.train.examples) == [("i feel so alone tonight", "sadness"), ("what a lovely morning", "joy"),
                                              ("i adore him", "love")]
        assert data.labels == names  # every class, in the ClassLabel's order, though anger is absent here
        assert pairs(data.eval_examples) == [("that scared me", "fear")]  # no test split: validation
    with pytest.raises(DataError, match=r"label names \['very negative'.* disagree with the export's ClassLabel names "
                                        r"\['sadness'.* of field 'label'"):
        run_data("--data", str(folder), "--recipe", "sst5")


def test_emotion_recipes_are_named_apart():
    """dair_emotion is the Hub's label set; the bundled emotion data (with disgust, without love) is not it."""
    with pytest.raises(DataError, match=r"recipe 'emotion' is ambiguous: use --recipe dair_emotion"):
        run_data("--data", str(BUNDLED_TRAIN), "--recipe", "emotion")
    with pytest.raises(DataError, match=r"emotion_train\.jsonl:\d+: label 'disgust' is not in the label set"):
        run_data("--data", str(BUNDLED_TRAIN), "--recipe", "dair_emotion")
    assert "disgust" in run_data("--data", str(BUNDLED_TRAIN)).labels


# ---------------------------------------------------------------------------
# MASSIVE (AmazonScience/massive, config "all": every locale in one set): utt, scenario and
# intent (ClassLabels), locale, partition. save_to_disk of its DatasetDict.

SCENARIOS = ["social", "transport", "calendar", "play", "news", "datetime", "recommendation", "email", "iot", "general",
             "audio", "lists", "qa", "cooking", "takeaway", "music", "alarm", "weather"]
INTENTS = """datetime_query iot_hue_lightchange transport_ticket takeaway_query qa_stock general_greet
recommendation_events music_dislikeness iot_wemo_off cooking_recipe qa_currency transport_traffic general_quirky
weather_query audio_volume_up email_addcontact takeaway_order email_querycontact iot_hue_lightup
recommendation_locations play_audiobook lists_createoradd news_query alarm_query iot_wemo_on general_joke
qa_definition social_query music_settings audio_volume_other calendar_remove iot_hue_lightdim calendar_query
email_sendemail iot_cleaning audio_volume_down play_radio cooking_query datetime_convert qa_maths iot_hue_lightoff
iot_hue_lighton transport_query music_likeness email_query play_music audio_volume_mute social_post alarm_set
qa_factoid calendar_set play_game alarm_remove lists_remove transport_taxi recommendation_movies iot_coffee
music_query play_podcasts lists_query""".split()
MASSIVE = {"id": STRING, "locale": STRING, "partition": STRING, "scenario": class_label(SCENARIOS),
           "intent": class_label(INTENTS), "utt": STRING, "annot_utt": STRING, "worker_id": STRING}
UTTERANCES = {  # locale -> (utt, scenario, intent)
    "en-US": [("wake me up at seven", "alarm", "alarm_set"), ("will it rain in paris", "weather", "weather_query"),
              ("put on some jazz", "play", "play_music")],
    "fr-FR": [("réveille-moi à sept heures", "alarm", "alarm_set")],
}


def massive_rows(partition):
    return [(str(i), locale, partition, SCENARIOS.index(s), INTENTS.index(n), utt, utt, "7")
            for locale, rows in UTTERANCES.items() for i, (utt, s, n) in enumerate(rows)]


@pytest.fixture
def massive(tmp_path):
    folder = tmp_path / "massive"
    splits = {"train": "train", "validation": "dev", "test": "test"}
    for split, partition in splits.items():
        save_to_disk(folder / split, MASSIVE, massive_rows(partition), split)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return folder


@needs_pyarrow
def test_massive_dataset_dict_with_locale_filter(massive):
    intents = run_data("--data", str(massive), "--eval-data", str(massive), "--filter", "locale=en-US",
                       "--text-field", "utt", "--label-field", "intent")
    en = [("wake me up at seven", "alarm_set"), ("will it rain in paris", "weather_query"), ("put on some jazz", "play_music")]
    assert pairs(intents.train.examples) == en and pairs(intents.eval_examples) == en
    assert intents.labels == INTENTS
    assert intents.train.examples[1].source == f"{massive / 'train' / 'data-00000-of-00001.arrow'}:2"
    scenarios = run_data("--data", f"{massive}:validation", "--filter", "locale=en-US", "--recipe", "massive")
    assert [e.label for e in scenarios.train.examples] == ["alarm", "weather", "play"]
    assert scenarios.labels == SCENARIOS
    # A ClassLabel field is filtered by its name; every filter must match.
    alarms = run_data("--data", str(massive), "--filter", "scenario=alarm", "--recipe", "massive")
    assert [e.text for e in alarms.train.examples] == ["wake me up at seven", "réveille-moi à sept heures"]
    with pytest.raises(DataError, match=r"massive: no examples \(--filter locale=en-us matches none of 4 rows; "
                                        r"locale has en-US, fr-FR\)"):
        run_data("--data", str(massive), "--filter", "locale=en-us", "--recipe", "massive")


def test_massive_raw_release_jsonl_with_partition_filter(tmp_path):
    """The raw release: one JSON Lines file per locale, every partition in it, names not indices."""
    path = tmp_path / "en-US.jsonl"
    rows = [{"id": "1", "locale": "en-US", "partition": p, "scenario": s, "intent": n, "utt": u}
            for p, (u, s, n) in zip(["train", "test", "train"], UTTERANCES["en-US"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = run_data("--data", str(path), "--filter", "partition=train", "--recipe", "massive")
    assert pairs(data.train.examples) == [("wake me up at seven", "alarm"), ("put on some jazz", "play")]
    assert [e.source for e in data.train.examples] == [f"{path}:1", f"{path}:3"]


# ---------------------------------------------------------------------------
# BBC News (SetFit/bbc-news): text, label (int64), label_text. Hub shards data/SPLIT-*.parquet,
# and the same rows as single files and a save_to_disk Dataset.

BBC = {"text": STRING, "label": INT64, "label_text": STRING}
BBC_TRAIN = [("shares rose after the merger", 1, "business"), ("the striker scored twice", 2, "sport"),
             ("a new phone was unveiled", 0, "tech"), ("the minister resigned", 4, "politics"),
             ("the band announced a tour", 3, "entertainment")]
BBC_TEST = [("the film won an award", 3, "entertainment")]


def by_text(rows):
    return [(text, name) for text, _, name in rows]


@needs_pyarrow
def test_bbc_news_layouts(tmp_path):
    data_dir = tmp_path / "bbc" / "data"
    write_parquet(data_dir / "train-00000-of-00002.parquet", hf_table(BBC, BBC_TRAIN[:2]))
    write_parquet(data_dir / "train-00001-of-00002.parquet", hf_table(BBC, BBC_TRAIN[2:]))
    write_parquet(data_dir / "test-00000-of-00001.parquet", hf_table(BBC, BBC_TEST))
    data = run_data("--data", str(data_dir), "--eval-data", str(data_dir), "--recipe", "bbc_news")
    assert pairs(data.train.examples) == by_text(BBC_TRAIN)  # both shards, in order
    assert data.train.examples[2].source == f"{data_dir / 'train-00001-of-00002.parquet'}:1"
    assert pairs(data.eval_examples) == by_text(BBC_TEST)
    # The same rows as one Parquet file, one Arrow stream, one Arrow IPC file (Feather v2, as pandas
    # and polars write .arrow) and a save_to_disk Dataset folder.
    feather = tmp_path / "feather" / "train.arrow"
    feather.parent.mkdir()
    with pa.ipc.new_file(str(feather), hf_table(BBC, BBC_TRAIN).schema) as writer:
        writer.write_table(hf_table(BBC, BBC_TRAIN))
    single = [write_parquet(tmp_path / "train.parquet", hf_table(BBC, BBC_TRAIN)),
              write_arrow(tmp_path / "train.arrow", hf_table(BBC, BBC_TRAIN)), feather,
              save_to_disk(tmp_path / "bbc_train", BBC, BBC_TRAIN, "train")]
    for path in single:
        assert pairs(run_data("--data", str(path), "--recipe", "bbc_news").train.examples) == by_text(BBC_TRAIN)
    with pytest.raises(DataError, match=r"bbc_train holds one dataset, not splits; drop ':test'"):
        run_data("--data", f"{single[-1]}:test", "--recipe", "bbc_news")


# ---------------------------------------------------------------------------
# Class names, splits and errors.


@needs_pyarrow
def test_class_names_from_dataset_info_json(tmp_path):
    """An Arrow file without the `huggingface` metadata: save_to_disk's dataset_info.json names the classes."""
    folder = save_to_disk(tmp_path / "emotion", EMOTION, [("i miss her", 0), ("so proud", 1)], "train", metadata=False)
    assert not pa.ipc.open_stream(pa.memory_map(str(folder / "data-00000-of-00001.arrow"))).schema.metadata
    assert [e.label for e in load_examples(folder).examples] == ["sadness", "joy"]


@needs_pyarrow
def test_split_errors(tmp_path, massive):
    with pytest.raises(DataError, match=r"massive:dev: no split 'dev'; the splits are \['test', 'train', 'validation'\]"
                                        r" \(pick one as .*massive:SPLIT\)"):
        load_examples(f"{massive}:dev")
    only_train = tmp_path / "only_train"
    write_parquet(only_train / "train-00000-of-00001.parquet", hf_table(EMOTION, [("hi", 1)]))
    with pytest.raises(DataError, match=r"only_train: no split 'test' or 'validation'; the splits are \['train'\]"):
        run_data("--data", str(only_train), "--eval-data", str(only_train))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \.parquet or \.arrow files in this folder or its subfolders"):
        load_examples(tmp_path / "empty")
    state = massive / "train" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "_indices_data_files": [{"filename": "indices.arrow"}]}))
    with pytest.raises(DataError, match=r"state\.json: this save_to_disk folder keeps an indices mapping"):
        load_examples(massive, "utt", "intent")


@needs_pyarrow
def test_unknown_or_malformed_filter(tmp_path, massive):
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow: no column 'language'; the columns are "
                                        r"\['id', 'locale', 'partition', 'scenario', 'intent', 'utt', 'annot_utt', "
                                        r"'worker_id'\]"):
        run_data("--data", str(massive), "--recipe", "massive", "--filter", "language=en-US")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: no field 'lang' to filter on; fields are \['label', 'text'\]"):
        run_data("--data", str(jsonl), "--filter", "lang=en")
    for bad, message in [("locale", r"expected FIELD=VALUE\[,FIELD=VALUE\.\.\.\], got 'locale'"),
                         ("locale=en-US,locale=fr-FR", r"field 'locale' is given twice")]:
        with pytest.raises(DataError, match=r"--filter '" + bad + "': " + message):
            run_data("--data", str(jsonl), "--filter", bad)


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.arrow").write_bytes(b"\xff\xff\xff\xff")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    for path, kind in [(tmp_path / "d.arrow", "Arrow"), (tmp_path / "export", "Parquet")]:
        with pytest.raises(DataError, match=rf": reading {kind} needs pyarrow, which is not installed: "
                                            r"pip install 'gtacore\[parquet\]' \(or pip install pyarrow\)"):
            load_examples(path)
