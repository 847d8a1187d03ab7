"""Our decoder against Hugging Face transformers on the same random weights."""

import pytest
import torch

from gtacore import models
from gtacore.models.attention import AttnSpec
from tiny_models import FAMILIES, write_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    path = write_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, ref, models.load_pretrained(path)


def test_logits_match_transformers(pair):
    family, ref, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (3, 41))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (3, 41, ours.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4, family


def test_family_features_are_read_from_config(pair):
    family, _, ours = pair
    cfg = ours.config
    assert cfg.tie_word_embeddings == family.endswith("-tied")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert cfg.qkv_bias == family.startswith("qwen2")
    assert cfg.qk_norm == family.startswith("qwen3")
    assert (cfg.rope_scaling is not None) == family.startswith("llama3")
    if family.startswith("qwen3"):
        assert cfg.head_dim == 24 != cfg.hidden_size // cfg.num_attention_heads


def test_packed_sequences_equal_separate_forwards(pair):
    """varlen attention over sequences packed in one row == each sequence alone."""
    _, _, ours = pair
    torch.manual_seed(2)
    lengths = [7, 1, 13]
    seqs = [torch.randint(0, ours.config.vocab_size, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]  # [1, N]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 8, 21], dtype=torch.int32)
    with torch.no_grad():
        got = ours(packed, positions=positions, spec=AttnSpec("varlen", cu_seqlens=cu, max_seqlen=13))[0]
        expected = torch.cat([ours(s[None])[0] for s in seqs])
    assert (got - expected).abs().max().item() <= 1e-5


def test_left_padded_mask_equals_unpadded(pair):
    _, _, ours = pair
    torch.manual_seed(3)
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    valid = torch.arange(pad + 9)[None] >= pad
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.ones(pad + 9, pad + 9, dtype=torch.bool).tril() & (valid[:, None, :] | torch.eye(pad + 9, dtype=torch.bool))
    with torch.no_grad():
        got = ours(padded, positions=positions, spec=AttnSpec("mask", mask[:, None]))[0, pad:]
        expected = ours(ids)[0]
    assert (got - expected).abs().max().item() <= 1e-5
