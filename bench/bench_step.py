"""One GTA step at a real model shape, stage by stage, with the policy forward/backward's MFU.

    python bench/bench_step.py [--shape qwen2.5-1.5b] [--prompts 8] [--group 16] [--prompt-len 256] [--new 128]

The step train.py runs, on random bf16-mixed weights (fp32 master weights, bf16 autocast) and
random prompts: rollout (KV-cache generation, G samples per prompt), old log-probs, then one
update: the SFT and RL forward/backward (shared prefix, fused LM-head loss), the gradient
constraint, AdamW. Stage times are medians of 3 steps after one warm-up step. MFU counts the
policy forward/backward as 6 * parameters * trained tokens (prompt tokens once, continuations)
against the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_decode import SHAPES, build
from common import REPO, measured_matmul_tflops, report, synchronize

from gtacore.losses import Branch, forward_backward, logprobs
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.parallel import compute_precision
from gtacore.projection import apply_gradient_constraint
from gtacore.kernels import LossSettings
from gtacore.models.generate import SamplingParams, generate

SFT_TOKENS = 8  # <guess>label</guess> is about this long
STAGES = ("rollout", "old_logprobs", "forward_backward", "constraint", "optimizer")


def step(model, optimizer, prompts, G: int, new: int, device, times: dict) -> int:
    """One step; adds each stage's seconds to `times`; returns the tokens the policy trained on."""
    params = list(model.parameters())

    def stage(name, fn):
        synchronize()
        t0 = time.perf_counter()
        out = fn()
        synchronize()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    with compute_precision("bf16-mixed" if device.type == "cuda" else "fp32", device):
        gen = stage("rollout", lambda: generate(model, prompts, SamplingParams(max_new_tokens=new, num_samples=G), [], 0,
                                                generator=torch.Generator(device).manual_seed(0), with_logprobs=False))
        conts = [row.tolist() for row in gen.tokens]  # no stop token: every row is `new` long
        shared = pack_prompts(prompts, device)
        rl = pack_rows(shared, gen.prompt_index.tolist(), conts, [[True] * new] * len(conts), RL_ROW,
                       torch.randn(len(conts)).tolist(), device)
        gold = [c[:SFT_TOKENS] for c in conts[::G]]  # a stand-in gold target per prompt
        sft = pack_rows(shared, range(len(prompts)), gold, [[True] * len(g) for g in gold], SFT_ROW, None, device)
        settings = LossSettings()
        rl_branch = Branch(rl, settings, old_logprobs=stage("old_logprobs", lambda: logprobs(model, rl, 1.0)))
        optimizer.zero_grad(set_to_none=True)
        results = stage("forward_backward", lambda: forward_backward(
            model, params, [Branch(sft, replace(settings, temperature=1.0)), rl_branch]))
    stage("constraint", lambda: apply_gradient_constraint(params, results[0].grads, results[1].grads))
    stage("optimizer", optimizer.step)
    return sum(len(p) for p in prompts) + sum(len(c) for c in conts) + sum(len(g) for g in gold)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help=f"from {list(SHAPES)} (default qwen2.5-1.5b; tiny without CUDA)")
    ap.add_argument("--prompts", type=int, default=None, help="B (default 8; tiny 2)")
    ap.add_argument("--group", type=int, default=None, help="G (default 16; tiny 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="P (default 256; tiny 16)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny 6)")
    ap.add_argument("--csv", type=Path, default=REPO / "runs" / "bench" / "bench_step.csv")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = args.shape or ("qwen2.5-1.5b" if cuda else "tiny")
    B, G = args.prompts or (8 if cuda else 2), args.group or (16 if cuda else 2)
    P, new = args.prompt_len or (256 if cuda else 16), args.new or (128 if cuda else 6)
    model = build(shape, device.type, torch.float32).train().requires_grad_(True)  # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    prompts = torch.randint(3, model.config.vocab_size, (B, P)).tolist()
    times: dict[str, list[float]] = {}
    tokens = 0
    for i in range(4):  # the first is the warm-up
        tokens = step(model, optimizer, prompts, G, new, device, times if i else {})
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    peak = measured_matmul_tflops(device.type, torch.bfloat16 if cuda else torch.float32) * 1e12
    mfu = 6 * n_params * tokens / median["forward_backward"] / peak
    case = {"shape": shape, "prompts": B, "group": G, "prompt_len": P, "new": new, "params_M": f"{n_params / 1e6:.0f}"}
    rows = [{**case, "method": name, "ms": f"{1e3 * median[name]:.4g}",
             "rate": f"{mfu:.3g}" if name == "forward_backward" else ""} for name in STAGES]
    rows.append({**case, "method": "step", "ms": f"{1e3 * sum(median.values()):.4g}"})
    report(rows, args.csv, "mfu")


if __name__ == "__main__":
    main()
