"""Checkpoints: round trips through transformers, sharding, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gtacore import models
from gtacore.models import CheckpointError, ConfigError
from tiny_models import FAMILIES, write_hf_checkpoint

transformers = pytest.importorskip("transformers")


def _ids(vocab):
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_saved_checkpoint_loads_in_transformers_with_same_logits(family, tmp_path):
    src = write_hf_checkpoint(family, tmp_path / "src")
    ours = models.load_pretrained(src)
    with torch.no_grad():  # make it ours: change weights so a stale copy would fail
        ours.model.norm.weight.mul_(1.5)
    out = models.save_pretrained(ours, tmp_path / "out", tokenizer_dir=src)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp folder left behind"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) != ours.config.tie_word_embeddings


def test_sharded_checkpoints_load_and_save(tmp_path):
    src = write_hf_checkpoint("llama3-untied", tmp_path / "src", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    ours = models.load_pretrained(src)
    out = models.save_pretrained(ours, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = models.load_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_load_casts_to_requested_dtype(tmp_path):
    src = write_hf_checkpoint("qwen2-tied", tmp_path / "src")
    m = models.load_pretrained(src, dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m(_ids(m.config.vocab_size)).dtype == torch.bfloat16


def test_overwrite_keeps_old_checkpoint_when_write_fails(tmp_path, monkeypatch):
    src = write_hf_checkpoint("qwen2-tied", tmp_path / "src")
    m = models.load_pretrained(src)
    out = models.save_pretrained(m, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("gtacore.models.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        models.save_pretrained(m, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---- bad input: each error names the problem ----


@pytest.fixture
def ckpt(tmp_path):
    return write_hf_checkpoint("llama3-untied", tmp_path / "ckpt")


def _edit_tensors(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        models.load_pretrained(ckpt)


def test_missing_lm_head_is_an_error_when_untied(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        models.load_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        models.load_pretrained(ckpt)


def test_wrong_shape_is_named(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(63,\), expected \(64,\)"):
        models.load_pretrained(ckpt)


def test_integer_tensor_is_rejected(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype torch\.int32"):
        models.load_pretrained(ckpt)


def test_truncated_file_is_reported(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        models.load_pretrained(ckpt)


def test_index_naming_a_missing_shard(tmp_path):
    src = write_hf_checkpoint("llama3-untied", tmp_path / "src", max_shard_size="20KB")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard {shard.name}, which does not exist"):
        models.load_pretrained(src)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FAMILIES["llama-tied"]))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        models.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_scaling.rope_type='yarn'"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3"),
        (dict(mlp_bias=True), "mlp_bias=True"),
    ],
)
def test_unsupported_config_is_named(tmp_path, edit, message):
    (tmp_path / "config.json").write_text(json.dumps({**FAMILIES["llama-tied"], **edit}))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        models.load_pretrained(tmp_path)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        models.load_pretrained(tmp_path)
