"""The memory estimate (gtacore/memory.py) against the measured peak of each phase of a training step.

    python bench/bench_memory.py                           # GPU: Qwen2.5-1.5B and 3B shapes, FSDP on one GPU
    python bench/bench_memory.py --shape qwen2.5-3b --shard ddp --batch-size 4

Builds a random-weight model of the shape (no download, no tokenizer) and runs a
training step's work as train.py does: generate G completions per prompt with the
KV cache, then the shared-prefix SFT and RL backward passes with reference
log-probs, the gradient constraint and an AdamW step. Each phase's peak
`torch.cuda.max_memory_allocated` is compared with the estimate's. With FSDP this
runs as one rank (a one-process group): the sharded code path, the whole rollout
copy and the gathered units, without the division by world size.

Sizes: the 3B shape with the reference model needs about 84 GB (an H200); on an
80 GB GPU pass --beta 0 (`python -m gtacore.memory` shows the parts).

On CPU there is no allocator to ask, so the script runs a tiny shape and reports
the estimate only (it keeps the script from rotting; tests/test_bench.py runs it).
"""

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, environment  # noqa: E402  (sets up the path and Triton's CPU mode)

from gtacore import models  # noqa: E402
from gtacore.config import LossArgs  # noqa: E402
from gtacore.distributed import DistInfo, init_distributed  # noqa: E402
from gtacore.losses import Branch, forward_backward, logprobs  # noqa: E402
from gtacore.memory import GB, StepShape, estimate_memory  # noqa: E402
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows  # noqa: E402
from gtacore.parallel import WholeModel, checkpoint_blocks, reshard, shard_model  # noqa: E402
from gtacore.projection import apply_gradient_constraint  # noqa: E402
from gtacore.models.config import ModelConfig  # noqa: E402
from gtacore.models.decoder import Decoder  # noqa: E402
from gtacore.models.generate import SamplingParams, generate  # noqa: E402

COMMON = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
              max_position_embeddings=32768)
SHAPES = {  # the published configs' shapes
    "qwen2.5-1.5b": dict(COMMON, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
    "tiny": dict(COMMON, vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def parse_args():
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["qwen2.5-1.5b", "qwen2.5-3b"] if cuda else ["tiny"])
    ap.add_argument("--shard", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--mode", choices=("gta", "grpo"), default="gta")
    ap.add_argument("--batch-size", type=int, default=4 if cuda else 2)
    ap.add_argument("--group-size", type=int, default=8 if cuda else 2)
    ap.add_argument("--prompt-tokens", type=int, default=256 if cuda else 16)
    ap.add_argument("--max-new-tokens", type=int, default=64 if cuda else 6)
    ap.add_argument("--sft-tokens", type=int, default=8 if cuda else 4)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--csv", type=Path, default=REPO / "runs" / "bench" / "bench_memory.csv")
    return ap.parse_args()


def random_model(mc: ModelConfig, device, dtype) -> Decoder:
    with torch.device("meta"):
        model = Decoder(mc)
    model.to_empty(device=device).to(dtype)
    if mc.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    return model


def phase_peak(fn):
    """(result, peak bytes allocated while fn ran, or nan on CPU)."""
    if not torch.cuda.is_available():
        return fn(), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


def run_shape(name: str, args, info: DistInfo) -> list[dict]:
    mc = models.ModelConfig.from_dict(SHAPES[name], source=name)
    device, cuda = info.device, info.device.type == "cuda"
    sharded = args.shard == "fsdp"
    policy = random_model(mc, device, torch.float32).train()
    if args.activation_checkpointing:
        checkpoint_blocks(policy)
    ref = random_model(mc, device, torch.float32).eval().requires_grad_(False) if args.beta > 0 else None
    copy = None
    if sharded:
        shard_model(policy, mixed_precision=cuda)
        if ref is not None:
            shard_model(ref, mixed_precision=cuda)
        copy = WholeModel(policy, torch.bfloat16 if cuda else torch.float32, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    B, G, Pt, T = args.batch_size, args.group_size, args.prompt_tokens, args.max_new_tokens
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, mc.vocab_size, (Pt,), generator=g).tolist() for _ in range(B)]
    rows = []
    for step in range(2):  # the second step has the optimizer state, as every later step does
        gen_model = copy.refresh(policy) if sharded else policy

        def rollout():
            with autocast:
                return generate(gen_model, prompts, SamplingParams(max_new_tokens=T, temperature=1.0, num_samples=G), [], 0,
                                torch.Generator(device=device).manual_seed(step))

        gen, rollout_peak = phase_peak(rollout)

        def training():
            pp = pack_prompts(prompts, device)
            conts = gen.tokens.tolist()
            rl = pack_rows(pp, [r // G for r in range(B * G)], conts, [[True] * len(c) for c in conts], RL_ROW,
                           torch.randn(B * G, generator=g).tolist(), device)
            sft_ids = [torch.randint(0, mc.vocab_size, (args.sft_tokens,), generator=g).tolist() for _ in range(B)]
            sft = pack_rows(pp, list(range(B)), sft_ids, [[True] * args.sft_tokens] * B, SFT_ROW, None, device)
            with autocast:
                ref_lp = logprobs(ref, rl, 1.0) if ref is not None else None
                if sharded and ref is not None:
                    reshard(ref)
                settings = LossArgs(beta=args.beta).settings(1.0, B * G * T)
                rl_settings = settings if ref_lp is not None else dataclasses.replace(settings, beta=0.0)
                branches = ([Branch(sft, dataclasses.replace(settings, beta=0.0))] if args.mode == "gta" else []) + \
                    [Branch(rl, rl_settings, None, ref_lp)]
                results = forward_backward(policy, params, branches)
            if args.mode == "gta":
                apply_gradient_constraint(params, results[0].grads, results[1].grads, "project", "per_param")
            else:
                for p, grad in zip(params, results[0].grads):
                    p.grad = grad
            optimizer.step()
            for p in params:
                p.grad = None

        _, training_peak = phase_peak(training)
    shape = StepShape(B, G, Pt, T, args.sft_tokens, args.mode, args.beta > 0)
    est = estimate_memory(mc, shape, world=1, sharded=sharded, param_bytes=4, compute_bytes=2 if cuda else 4, autocast=cuda,
                          checkpointed=args.activation_checkpointing)
    for phase, measured in (("rollout", rollout_peak), ("training", training_peak)):
        predicted = est[f"phase_{phase}"]
        rows.append({"shape": name, "shard": args.shard, "mode": args.mode, "ac": args.activation_checkpointing, "B": B,
                     "G": G, "prompt": Pt, "new": T,
                     "phase": phase, "estimate_GB": f"{predicted / GB:.3g}",
                     "measured_GB": f"{measured / GB:.3g}" if measured == measured else "n/a",
                     "measured/estimate": f"{measured / predicted:.3f}" if measured == measured else "n/a"})
    return rows  # the models go with this frame; main() empties the CUDA cache before the next shape


def main():
    args = parse_args()
    info = init_distributed(need_group=args.shard == "fsdp")
    rows = []
    for name in args.shape:
        t0 = time.perf_counter()
        rows += run_shape(name, args, info)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    env = environment()
    print(" | ".join(f"{k}={v}" for k, v in env.items()))
    columns = list(rows[0])
    print("  ".join(f"{c:>12}" for c in columns))
    for r in rows:
        print("  ".join(f"{str(r[c]):>12}" for c in columns))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + list(env))
        writer.writeheader()
        writer.writerows({**r, **env} for r in rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
