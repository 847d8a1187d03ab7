"""The memory estimate: parameter counts, per-rank division, KV cache and saved activations
against what the model actually allocates and saves."""

import pytest
import torch

from gtacore.memory import StepShape, activation_bytes_per_token_layer, estimate_memory, format_estimate, parameter_count
from gtacore.models.config import ModelConfig
from gtacore.models.decoder import Decoder, KVCache
from tiny_models import FAMILIES


def _config(family: str) -> ModelConfig:
    return ModelConfig.from_dict(dict(FAMILIES[family], hidden_size=128, intermediate_size=160))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_matches_the_model(family):
    mc = _config(family)
    with torch.device("meta"):
        model = Decoder(mc)
    total, block, root = parameter_count(mc)
    assert total == sum(p.numel() for p in model.parameters())
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert root == total - mc.num_hidden_layers * block


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_activations_match_what_autograd_keeps(family):
    mc = _config(family)
    torch.manual_seed(0)
    model = Decoder(mc)
    model.reset_rope()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    N = 48
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, mc.vocab_size, (1, N)), return_hidden=True)
    # CPU SDPA (math path) also keeps the attention probabilities; flash/efficient kernels on GPU do not.
    scores = mc.num_hidden_layers * mc.num_attention_heads * N * N * 4
    final_norm = 2 * N * mc.hidden_size * 4
    predicted = N * mc.num_hidden_layers * activation_bytes_per_token_layer(mc, 4) + final_norm + scores
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.03)


def test_kv_cache_and_sharding_arithmetic():
    mc = _config("llama3-untied")
    shape = StepShape(batch=3, group=4, prompt_tokens=20, new_tokens=10, sft_tokens=5, mode="gta", reference=True)
    ddp1 = estimate_memory(mc, shape, world=1, sharded=False, param_bytes=4, compute_bytes=4, autocast=False)
    ddp4 = estimate_memory(mc, shape, world=4, sharded=False, param_bytes=4, compute_bytes=4, autocast=False)
    fsdp4 = estimate_memory(mc, shape, world=4, sharded=True, param_bytes=4, compute_bytes=4, autocast=False)
    P = parameter_count(mc)[0]
    assert ddp1["weights"] == ddp4["weights"] == 4 * fsdp4["weights"] == 4 * P
    assert ddp1["optimizer"] == 4 * fsdp4["optimizer"] == 8 * P
    assert ddp1["gradients"] == 8 * P  # gta holds the SFT and RL gradients at once
    assert ddp1["allreduce_buffer"] == 0 and ddp4["allreduce_buffer"] == 4 * P and fsdp4["allreduce_buffer"] == 0
    assert fsdp4["rollout_copy"] == 4 * P and ddp4["rollout_copy"] == 0
    assert fsdp4["phase_load"] == 4 * P + P and ddp4["phase_load"] == 8 * P  # whole model + the other's shards
    # The cache generate() allocates: B rows for the prefill, then B*G rows.
    caches = [KVCache(mc, rows, 30, torch.float32, "meta") for rows in (3, 12)]
    assert ddp1["kv_cache"] == sum(c.k.numel() * 4 + c.v.numel() * 4 for c in caches)
    # The fp32 policy generates under autocast with an fp32 cache; FSDP's bf16 copy with a bf16 one.
    mixed = dict(param_bytes=4, compute_bytes=2, autocast=True)
    assert estimate_memory(mc, shape, world=1, sharded=False, **mixed)["kv_cache"] == ddp1["kv_cache"]
    assert estimate_memory(mc, shape, world=1, sharded=True, **mixed)["kv_cache"] == ddp1["kv_cache"] / 2
    grpo = estimate_memory(mc, StepShape(3, 4, 20, 10, 5, "grpo", True), world=1, sharded=False, param_bytes=4,
                           compute_bytes=4, autocast=False)
    assert grpo["gradients"] == ddp1["gradients"] / 2
    sft = estimate_memory(mc, StepShape(3, 4, 20, 10, 5, "sft", True), world=1, sharded=False, param_bytes=4,
                          compute_bytes=4, autocast=False)
    assert sft["kv_cache"] == sft["reference"] == 0
    for est in (ddp1, fsdp4, grpo, sft):
        assert est["peak"] == max(est["phase_load"], est["phase_rollout"], est["phase_training"])
    assert "predicted peak" in format_estimate(ddp1, "x")


def test_activation_checkpointing_keeps_one_hidden_state_per_token_and_layer():
    mc = _config("llama3-untied")
    shape = StepShape(batch=4, group=8, prompt_tokens=100, new_tokens=50, sft_tokens=5, mode="gta", reference=False)
    kw = dict(world=1, sharded=False, param_bytes=4, compute_bytes=2, autocast=True)
    full = estimate_memory(mc, shape, **kw)["activations"]
    ckpt = estimate_memory(mc, shape, checkpointed=True, **kw)["activations"]
    tokens = 4 * 100 + 4 * 8 * 50
    per_layer = activation_bytes_per_token_layer(mc, 2)
    L, D = mc.num_hidden_layers, mc.hidden_size
    assert full == tokens * (L * per_layer + 2 * D * 2)
    assert ckpt == tokens * (L * D * 2 + per_layer + 2 * D * 2)
