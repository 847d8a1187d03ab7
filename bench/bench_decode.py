"""Decode speed: our KV-cache `generate` (eager step, and the step replayed as a CUDA graph) against
transformers' `generate` with its static cache, and against the bandwidth floor.

    python bench/bench_decode.py [--shapes smollm2-135m qwen2.5-1.5b] [--prompts 8] [--group 16]
                                 [--prompt-len 256] [--new 128] [--csv F]

Random bf16 weights with the real configurations (speed does not depend on weight values),
prompts of random tokens, sampling at T = 1 with no stop token, so every row decodes `--new`
tokens. A decode step's time is (generate with --new tokens - generate with 1) / (new - 1): the
prefill cancels out. Its floor reads every weight once and, per row, the whole cache a static
step attends to (P + new slots, k and v, every layer), at the copy bandwidth measured here.
The batch-1 row decodes one prompt, one sample: the latency case.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import REPO, measured_bandwidth_gbs, report, synchronize

from gtacore import models
from gtacore.models.generate import SamplingParams, generate

SHAPES = {  # config.json fields of the real models (random weights)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def build(shape: str, device: str, dtype: torch.dtype) -> models.Decoder:
    torch.manual_seed(0)
    model = models.Decoder(models.ModelConfig.from_dict(SHAPES[shape], source=shape))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def hf_model(shape: str, device: str, dtype: torch.dtype):
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.AutoConfig.for_model(**SHAPES[shape])
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def seconds(fn) -> float:
    """Median of three timed calls after one warm-up (each call is a whole generation)."""
    fn()
    times = []
    for _ in range(3):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=None, help=f"from {list(SHAPES)} (default: the two real ones; tiny without CUDA)")
    ap.add_argument("--prompts", type=int, default=None, help="B (default 8; tiny 2)")
    ap.add_argument("--group", type=int, default=None, help="G samples per prompt (default 16; tiny 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="P (default 256; tiny 16)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny 6)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--csv", type=Path, default=REPO / "runs" / "bench" / "bench_decode.csv")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = args.shapes or (["smollm2-135m", "qwen2.5-1.5b"] if cuda else ["tiny"])
    B, G = args.prompts or (8 if cuda else 2), args.group or (16 if cuda else 2)
    P, new = args.prompt_len or (256 if cuda else 16), args.new or (128 if cuda else 6)
    bandwidth = measured_bandwidth_gbs(device) * 1e9  # bytes per second
    rows = []
    for shape in shapes:
        model = build(shape, device, dtype)
        cfg = model.config
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch, group in ((B, G), (1, 1)):
            N = batch * group
            prompts = torch.randint(3, cfg.vocab_size, (batch, P)).tolist()
            kv_bytes = N * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * (P + new) * model.lm_head.weight.element_size()
            floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
            case = {"shape": shape, "rows": N, "prompt_len": P, "new": new, "floor_ms": f"{floor_ms:.4g}"}
            methods = {"ours-eager": False}
            if cuda:
                methods["ours-graph"] = True
            for method, graph in methods.items():
                def run(n, graph=graph):
                    params = SamplingParams(max_new_tokens=n, temperature=1.0, num_samples=group, cuda_graph=graph)
                    return generate(model, prompts, params, [], 0, generator=torch.Generator(device).manual_seed(0),
                                    with_logprobs=True)
                rows.append(row(case, method, seconds(lambda: run(new)), seconds(lambda: run(1)), N, new, floor_ms))
            hf = None if args.no_hf or batch == 1 else hf_model(shape, device, dtype)
            if hf is not None:
                ids = torch.tensor(prompts, device=device)

                def run_hf(n):
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=n,
                                       min_new_tokens=n, num_return_sequences=group, cache_implementation="static",
                                       pad_token_id=0, top_k=0)
                try:
                    rows.append(row(case, "transformers-static", seconds(lambda: run_hf(new)), seconds(lambda: run_hf(1)),
                                    N, new, floor_ms))
                except Exception as error:  # an API difference across versions: report it, keep going
                    rows.append({**case, "method": "transformers-static", "ms": f"error: {type(error).__name__}: {error}"[:120]})
                del hf
        del model
        if cuda:
            torch.cuda.empty_cache()
    report(rows, args.csv, "tokens_per_s")


def row(case: dict, method: str, total_s: float, prefill_s: float, N: int, new: int, floor_ms: float) -> dict:
    step_ms = 1e3 * max(total_s - prefill_s, 0.0) / max(new - 1, 1)
    return {**case, "method": method, "ms": f"{step_ms:.4g}", "rate": f"{N * new / total_s:.4g}",
            "of_peak": f"{floor_ms / step_ms:.3g}" if step_ms > 0 else ""}


if __name__ == "__main__":
    main()
