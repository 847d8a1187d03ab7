"""Per-rank device memory of a training step, estimated from the shapes; printed at start.

A step has two phases, the start has one more, and the peak is the largest:

    load:     a whole model as it is read, before FSDP shards it (plus the policy's
              shards while the reference loads)
    rollout:  weights, optimizer state, reference model, (FSDP) the whole copy that
              generates, the KV cache (B rows for the prefill, then B*G rows, of
              [L, 2, Hkv, P+T, Dh]), the sampling logits
    training: weights, optimizer state, reference model, (FSDP) the whole copy,
              the gradients (gta holds two: SFT and RL stay apart until the
              constraint), saved activations of the prompt pass and one branch,
              the fused LM-head loss's chunk logits and fp32 head gradient,
              (FSDP) the gathered units, (DDP) the flat all-reduce buffer,
              (autocast) the bf16 copies of fp32 weights

Counted per rank: with FSDP, weights, gradients and optimizer state are divided
by the number of ranks; with DDP they are not. Saved activations per token per
layer are the tensors a Llama/Qwen block keeps for its backward:

    x and norm(x) before attention and before the MLP   4 D
    q, k, v and the attention output (SDPA), o_proj in   3 H*Dh + 2 Hkv*Dh
    gate, silu(gate), up, and down_proj's input           4 F   (F: intermediate size)
    (Qwen3) q and k around their RMSNorm                  2 (H + Hkv) Dh

With activation checkpointing a block keeps only its input (D per token and
layer), plus one block's full set while that block is recomputed.

Not counted: the CUDA context and allocator slack (typically 0.5-2 GB), the
attention scores of the explicit-mask SDPA fallback (quadratic in a group's
length; zero with flash attention), and Python-side buffers. So the estimate
is a floor to compare with `torch.cuda.max_memory_allocated`, not with
nvidia-smi.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from gtacore.models.config import ModelConfig

from .config import add_config_flags, apply_flags, gpu_config
from .prompts import make_prompts, sft_targets

GB = 1e9


def parameter_count(mc: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, one block's, the root's: embedding + final norm + untied head) of the Decoder."""
    D, F, H, Hkv, Dh = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    attn = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D
    if mc.qkv_bias:
        attn += H * Dh + 2 * Hkv * Dh
    if mc.o_bias:
        attn += D
    if mc.qk_norm:
        attn += 2 * Dh
    block = attn + 3 * D * F + 2 * D
    root = mc.vocab_size * D * (1 if mc.tie_word_embeddings else 2) + D
    return block * mc.num_hidden_layers + root, block, root


def activation_bytes_per_token_layer(mc: ModelConfig, dtype_bytes: int) -> int:
    """Bytes a block saves for its backward per token (see the module docstring)."""
    D, F, H, Hkv, Dh = mc.hidden_size, mc.intermediate_size, mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    elements = 4 * D + 3 * H * Dh + 2 * Hkv * Dh + 4 * F
    if mc.qk_norm:  # q and k before and after their RMSNorm
        elements += 2 * (H + Hkv) * Dh
    return elements * dtype_bytes


@dataclass
class StepShape:
    batch: int  # prompts per rank
    group: int  # G
    prompt_tokens: int  # the longest prompt
    new_tokens: int  # max_new_tokens
    sft_tokens: int  # teacher-forced target length (gta/sft)
    mode: str
    reference: bool  # a reference model is loaded (beta > 0)


def estimate_memory(mc: ModelConfig, shape: StepShape, *, world: int, sharded: bool, param_bytes: int,
                    compute_bytes: int, autocast: bool, checkpointed: bool = False) -> dict[str, float]:
    """Bytes per rank of each part, the two phases and the peak (see the module docstring)."""
    P, block, root = parameter_count(mc)
    s = world if sharded else 1
    D, Hkv, Dh, L, V = mc.hidden_size, mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers, mc.vocab_size
    B, G, T, Pt = shape.batch, shape.group, shape.new_tokens, shape.prompt_tokens
    rl = shape.mode != "sft"
    n_grads = 2 if shape.mode == "gta" else 1
    parts = {
        "weights": P * param_bytes / s,
        "optimizer": 2 * P * param_bytes / s,  # AdamW's two moments, in the parameters' dtype
        "reference": P * param_bytes / s if shape.reference and rl else 0.0,
        "rollout_copy": P * compute_bytes if sharded else 0.0,
        "autocast_copies": P * compute_bytes if autocast and not sharded and compute_bytes != param_bytes else 0.0,
    }
    rows = B * G if rl else 0
    # generate() keeps the cache in the generating model's dtype: the policy's (DDP) or the copy's (FSDP).
    kv_bytes = compute_bytes if sharded else param_bytes
    parts["kv_cache"] = 2 * L * (rows + B) * (Pt + T) * Hkv * Dh * kv_bytes if rl else 0.0
    parts["sampling_logits"] = 3 * rows * V * 4
    parts["gradients"] = n_grads * P * param_bytes / s
    parts["allreduce_buffer"] = P * param_bytes if not sharded and world > 1 else 0.0
    tokens = B * Pt + max(rows * T, B * shape.sft_tokens)  # the prompt pass and the larger branch
    per_token_layer = activation_bytes_per_token_layer(mc, compute_bytes)
    if checkpointed:  # every block's input, and one block's activations while it is recomputed
        per_token = L * D * compute_bytes + per_token_layer
    else:
        per_token = L * per_token_layer
    parts["activations"] = tokens * (per_token + 2 * D * compute_bytes)  # + the final norm's input and output
    loss_rows = max(rows * T, B * shape.sft_tokens, 1)
    chunk = min(max(loss_rows * D // V, 256), loss_rows)
    parts["loss_logits"] = 2 * chunk * V * 4 + V * D * 4 + loss_rows * D * 4  # logits + grad, fp32 head grad, grad_hidden
    parts["gathered_units"] = (2 * block + root) * compute_bytes if sharded else 0.0

    shared = ("weights", "optimizer", "reference", "rollout_copy", "autocast_copies")
    rollout = sum(parts[k] for k in shared) + parts["kv_cache"] + parts["sampling_logits"]
    training = sum(parts[k] for k in shared) + sum(parts[k] for k in ("gradients", "allreduce_buffer", "activations",
                                                                        "loss_logits", "gathered_units"))
    # Start-up: each model is loaded whole onto the device, then sharded (FSDP) before the next.
    load = P * param_bytes + (parts["weights"] if parts["reference"] else 0.0)
    return {**parts, "phase_load": load, "phase_rollout": rollout, "phase_training": training,
            "peak": max(load, rollout, training)}


def estimate_for_run(cfg, model_config: ModelConfig, tok, examples, labels, shots, world: int,
                     truncate: bool) -> dict[str, float]:
    """The estimate for train.py's configuration; prompt and target lengths are measured
    on the first examples (their prompts are rendered, nothing runs)."""
    mode = cfg.loss.mode
    sample = make_prompts(tok, examples[:32], labels, mode, shots, cfg.rollout.max_prompt_tokens, truncate,
                          cfg.data.system_prompt, cfg.data.template_system_prompt)
    sft_tokens = 0 if mode == "grpo" else max(len(t) for t in sft_targets(tok, sample, mode)[0])
    shape = StepShape(batch=cfg.rollout.batch_size, group=cfg.rollout.group_size, prompt_tokens=max(len(p.ids) for p in sample),
                      new_tokens=cfg.rollout.max_new_tokens, sft_tokens=sft_tokens, mode=mode, reference=cfg.loss.beta > 0)
    bf16 = cfg.model.precision == "bf16-mixed"  # bf16 autocast (DDP) or bf16 gathers (FSDP); fp32 weights either way
    return estimate_memory(model_config, shape, world=world, sharded=cfg.run.shard == "fsdp", param_bytes=4,
                           compute_bytes=2 if bf16 else 4, autocast=bf16,
                           checkpointed=cfg.run.activation_checkpointing)


def _size(n: float) -> str:
    return f"{n / GB:9.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:9.2f} MB"


def format_estimate(est: dict[str, float], header: str) -> str:
    lines = [header]
    for k, v in est.items():
        if not (k.startswith("phase_") or k == "peak" or v == 0):
            lines.append(f"  {k:<18}{_size(v)}")
    lines.append(f"  {'load phase':<18}{_size(est['phase_load'])}")
    lines.append(f"  {'rollout phase':<18}{_size(est['phase_rollout'])}")
    lines.append(f"  {'training phase':<18}{_size(est['phase_training'])}")
    lines.append(f"  {'predicted peak':<18}{_size(est['peak'])} per rank (+ CUDA context and allocator slack)")
    return "\n".join(lines)


def main(argv=None) -> None:
    """Plan a run before starting it: `python -m gtacore.memory --config CKPT/config.json --world 8 --shard fsdp`.
    The run's flags take train.py's GPU defaults."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True, help="a checkpoint's config.json (no weights are read)")
    ap.add_argument("--world", type=int, default=1, help="ranks (GPUs)")
    ap.add_argument("--prompt-tokens", type=int, default=400, help="the longest prompt")
    ap.add_argument("--sft-tokens", type=int, default=8)
    ap.add_argument("--param-bytes", type=int, default=4, help="4: fp32 weights (bf16 compute), 2: bf16 weights")
    add_config_flags(ap, {k: ("--" + k[1].replace("_", "-"), None) for k in FIELDS})
    args = ap.parse_args(argv)
    cfg = apply_flags(gpu_config(), vars(args))
    L, R = cfg.loss, cfg.rollout
    mc = ModelConfig.from_file(args.config)
    shape = StepShape(R.batch_size, R.group_size, args.prompt_tokens, R.max_new_tokens, args.sft_tokens, L.mode, L.beta > 0)
    est = estimate_memory(mc, shape, world=args.world, sharded=cfg.run.shard == "fsdp", param_bytes=args.param_bytes,
                          compute_bytes=2, autocast=True, checkpointed=cfg.run.activation_checkpointing)
    print(format_estimate(est, f"{args.config}: {parameter_count(mc)[0] / 1e9:.2f}B parameters, {cfg.run.shard} on {args.world} GPU(s)"))


# The training config's fields that shape the estimate.
FIELDS = [("run", "shard"), ("loss", "mode"), ("rollout", "batch_size"), ("rollout", "group_size"),
          ("rollout", "max_new_tokens"), ("loss", "beta"), ("run", "activation_checkpointing")]


if __name__ == "__main__":
    main()
