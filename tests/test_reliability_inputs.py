"""Bad inputs that the other test files leave open, and a proof that nothing unpickles.

Every bad data file, checkpoint, config or tokenizer must stop with an error that names the
file (and the line, tensor or key) and must never half-load. Most cases are pinned in
test_data.py, test_checkpoint.py and test_tokenizer.py; this file adds the ones they miss and
asserts the file path where they only match a phrase.
"""

import _pickle
import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, write_hf_checkpoint
from tokenizer_fixtures import write_tokenizer
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

from gtacore import models
from gtacore.checkpointing import load_trainer_state, save_checkpoint
from gtacore.data import DataError, load_examples
from gtacore.run_data import load_dataset_from_args
from gtacore.batches import BatchSampler
from gtacore.models import CheckpointError, ConfigError
from gtacore.models.tokenizer import Tokenizer, TokenizerError


def at(path) -> str:
    """A regex matching `path` literally at the start of a message."""
    return "^" + str(path).replace("\\", "\\\\").replace(".", r"\.")


# ---------------------------------------------------------------------------
# Data.


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r":2: no field 'label'; fields are \['text'\]"),
    ("d.csv", "text,label\na,x\n,y\n", r":3: empty text in field 'text'"),
    ("d.csv", "text,label\na,x\nb\n", r":3: 1 fields but the header has 2"),
])
def test_row_without_text_or_label(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=at(path) + message):
        load_examples(path)


def test_empty_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=at(path) + ": file is empty"):
        load_examples(path)


def test_skip_unknown_labels_flag(tmp_path, caplog):
    """The trainer's --skip-unknown-labels, through the loader train.py calls."""
    train = tmp_path / "train.jsonl"
    rows = [("a", "joy"), ("b", "boredom"), ("c", "fear"), ("d", "boredom"), ("e", "joy")]
    train.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    with pytest.raises(DataError, match=at(train) + r":2: label 'boredom' is not in the label set "
                                                    r"\['joy', 'fear'\]; fix --labels, or pass --skip-unknown-labels"):
        load_dataset_from_args(str(train), None, None, "text", "label", "joy,fear", 0, 0)
    with caplog.at_level(logging.WARNING, logger="gtacore.data"):
        data, _ = load_dataset_from_args(str(train), None, None, "text", "label", "joy,fear", 0, 0, skip_unknown=True)
    assert [e.text for e in data.examples] == ["a", "c", "e"] and data.skipped == 2
    assert data.labels == ["joy", "fear"]
    assert f"{train}: skipped 2 rows with labels outside the label set" in caplog.text
    # The eval file is held to the training label set and skips the same way.
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"text": "f", "label": "anger"}\n{"text": "g", "label": "fear"}\n')
    held, _ = load_dataset_from_args(str(evaluation), None, None, "text", "label", None, 0, 0, True, label_set=data.labels)
    assert [e.text for e in held.examples] == ["g"] and held.skipped == 1


def test_dataset_smaller_than_one_batch(tmp_path):
    path = write_dataset(tmp_path / "small.jsonl", 7)
    data, _ = load_dataset_from_args(str(path), str(path), None, "text", "label", None, 0, 0)
    n = len(data.examples)
    with pytest.raises(DataError, match=at(path) + r": 7 examples are fewer than one global batch "
                                                   r"\(4 per rank x 2 ranks = 8\); lower the batch size or add data"):
        BatchSampler(n, 4, rank=1, world_size=2, source=str(path))
    assert BatchSampler(n, 7, source=str(path)).steps_per_epoch == 1  # exactly one batch is enough
    with pytest.raises(DataError, match=at(path) + ": cannot pick 8 few-shot examples from 7"):
        load_dataset_from_args(str(path), str(path), None, "text", "label", None, 8, 0)


# ---------------------------------------------------------------------------
# Checkpoints and model configs.


@pytest.fixture
def ckpt(tmp_path):
    return write_hf_checkpoint("llama3-untied", tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path):
    path = write_hf_checkpoint("llama3-untied", tmp_path / "sharded", max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


@pytest.mark.parametrize("tensor, message", [
    (torch.ones(63), r": tensor model\.norm\.weight has shape \(63,\), expected \(64,\)"),
    (torch.ones(64, dtype=torch.int32), r": tensor model\.norm\.weight has dtype torch\.int32, expected a floating-point"),
    (torch.ones(64, dtype=torch.bool), r": tensor model\.norm\.weight has dtype torch\.bool, expected a floating-point"),
])
def test_bad_tensor_names_the_file_and_tensor(ckpt, tensor, message):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"] = tensor
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=at(file) + message):
        models.load_pretrained(ckpt)


def test_truncated_shard_is_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    for cut in (len(data) - 1, 5):  # the tensor data, then the header itself
        shard.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=at(shard) + ": unreadable safetensors file .*truncated"):
            models.load_pretrained(sharded)


def test_index_placing_a_tensor_in_a_shard_that_lacks_it(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=at(shard) + r": does not hold tensors model\.norm\.weight, "
                                                          r"which model\.safetensors\.index\.json places there"):
        models.load_pretrained(sharded)


@pytest.mark.parametrize("content", [b"{oops", b"[]", b'{"weight_map": ["model.norm.weight"]}', b'{"weight_map": {"a": 1}}',
                                     b'{"weight_map": {"\xff": "x"}}'])
def test_malformed_index_is_named(sharded, content):
    index = sharded / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(CheckpointError, match=at(index) + ": malformed index"):
        models.load_pretrained(sharded)


def test_missing_and_malformed_config_name_the_file(tmp_path):
    config = tmp_path / "config.json"
    with pytest.raises(ConfigError, match=at(config) + r": no config\.json"):
        models.load_pretrained(tmp_path)
    config.write_text('{"model_type": "llama",\n "hidden_size": 64,,}')
    with pytest.raises(ConfigError, match=at(config) + ": malformed JSON: .*line 2"):
        models.load_pretrained(tmp_path)
    config.write_bytes(b'{"model_type": "ll\xe9ama"}')
    with pytest.raises(ConfigError, match=at(config) + ": malformed JSON: 'utf-8' codec"):
        models.load_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "gpt2"}, r"model_type='gpt2' is not supported \(supported: llama, qwen2, qwen3\)"),
    ({"model_type": "mistral", "sliding_window": 4096}, r"model_type='mistral' is not supported"),
    ({"hidden_size": "64"}, r"hidden_size='64' must be a positive integer"),
    ({"vocab_size": 256.5}, r"vocab_size=256\.5 must be a positive integer"),
    ({"num_hidden_layers": None}, r"num_hidden_layers=None must be a positive integer"),
    ({"num_attention_heads": 0}, r"num_attention_heads=0 must be a positive integer"),
    ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps='1e-6' must be a positive number"),
    ({"rope_scaling": "llama3"}, r"rope_scaling='llama3' must be a JSON object or null"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"llama3 rope scaling is missing required key 'original_max_position_embeddings'"),
])
def test_bad_config_names_the_file_and_key(tmp_path, edit, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**FAMILIES["llama-tied"], **edit}))
    with pytest.raises(ConfigError, match=at(config) + ": " + message):
        models.load_pretrained(tmp_path)


# ---------------------------------------------------------------------------
# Tokenizers.


@pytest.fixture
def tok_dir(tmp_path):
    return write_tokenizer(tmp_path / "tok", ["<guess>joy</guess> I feel glad."] * 5, vocab_size=280)


def test_tokenizer_without_chat_template_or_eos(tok_dir):
    config_file = tok_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": None}))
    tok = Tokenizer(tok_dir)  # plain encoding still works; a chat prompt cannot be built
    assert tok.decode(tok.encode("I feel glad.")) == "I feel glad."
    with pytest.raises(TokenizerError, match=at(tok_dir) + ": the tokenizer has no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    config_file.write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(TokenizerError, match=at(config_file) + ": no eos_token"):
        Tokenizer(tok_dir)
    config_file.write_text(json.dumps({**config, "eos_token": {"content": "<|eot_id|>"}}))
    with pytest.raises(TokenizerError, match=at(tok_dir) + r": eos_token '<\|eot_id\|>' is not in the vocabulary"):
        Tokenizer(tok_dir)
    config_file.write_text("{not json")
    with pytest.raises(TokenizerError, match=at(config_file) + ": malformed JSON"):
        Tokenizer(tok_dir)


def test_malformed_tokenizer_json_is_named(tok_dir):
    file = tok_dir / "tokenizer.json"
    file.write_text(file.read_text()[:100])
    with pytest.raises(TokenizerError, match=at(file) + ": cannot load"):
        Tokenizer(tok_dir)


# ---------------------------------------------------------------------------
# Nothing unpickles.


def test_nothing_unpickles(tmp_path, monkeypatch):
    """Model, tokenizer and trainer checkpoint all load with every unpickling entry point disabled."""
    base = write_tiny_checkpoint(tmp_path / "base")  # transformers writes it; our code only reads it

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (_pickle, "load"),
                         (_pickle, "loads"), (_pickle, "Unpickler"), (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(AssertionError, match="unpickle"):  # the trap is armed
        torch.load(tmp_path / "base" / "model.safetensors")

    model = models.load_pretrained(base).train()
    tok = Tokenizer(base)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "I feel glad."}]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([prompt])).logsumexp(-1).mean().backward()
    optimizer.step()
    sampler = BatchSampler(30, 4, seed=3)
    sampler.next_batch()
    saved = save_checkpoint(tmp_path / "checkpoint-1", model, base, optimizer,
                            {"step": 1, "sampler": sampler.state_dict(), "labels": LABELS})

    again = models.load_pretrained(saved).train()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert Tokenizer(saved).encode("I feel glad.") == tok.encode("I feel glad.")
    resumed = torch.optim.AdamW(again.parameters(), lr=1e-3)
    state = load_trainer_state(saved, resumed)
    assert state == {"step": 1, "sampler": sampler.state_dict(), "labels": LABELS}
    before, after = optimizer.state_dict(), resumed.state_dict()
    assert after["param_groups"] == json.loads(json.dumps(before["param_groups"]))  # JSON: betas come back a list
    assert before["state"].keys() == after["state"].keys() and len(before["state"]) == len(list(model.parameters()))
    for i, per_param in before["state"].items():
        assert per_param.keys() == after["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(per_param[k], after["state"][i][k]) for k in per_param)
        assert per_param["exp_avg_sq"].abs().max() > 0  # the step really happened
    # The restored optimizer takes the very step the original takes.
    for m, opt in ((model, optimizer), (again, resumed)):
        opt.zero_grad()
        m(torch.tensor([prompt])).logsumexp(-1).mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_a_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path):
    import train

    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_dataset(tmp_path / "train.jsonl", 12)
    config = json.loads((model / "config.json").read_text())
    need = Tokenizer(model).vocab_size
    rows = need - 2  # the tokenizer now has 2 ids past the embedding table
    config["vocab_size"] = rows
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=rf"{model}.*needs {need} embedding rows, but the model has {rows}"):
        train.main(["--model", str(model), "--data", str(data), "--device", "cpu", "--no-progress",
                    "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
