"""Rollouts: G sampled completions per prompt, decoded, with the token mask of the RL loss.

Generation is `gtacore.models.generate` (KV cache, one prefill per prompt shared by its G samples);
the rewards and advantages are computed from the texts by the training step itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtacore.models.generate import SamplingParams, generate
from gtacore.models.tokenizer import Tokenizer

from .completions import rl_mask, span_codes
from .config import RolloutArgs
from .prompts import Prompt


@dataclass
class Rollouts:
    completions: list[list[int]]  # [B*G] generated ids (EOS included when emitted)
    texts: list[str]  # [B*G] decoded without special tokens
    rl_masks: list[list[bool]]  # [B*G] which completion tokens the RL loss sees (all but the guess block)
    num_tokens: int  # generated tokens in all


def rollout(model, tok: Tokenizer, prompts: list[Prompt], mode: str, args: RolloutArgs, generator: torch.Generator) -> Rollouts:
    """Sample args.group_size completions of each prompt; row r belongs to prompt r // G.

    No log-probs are kept: the loss computes the old ones itself (ratios are then exactly 1 at
    mu = 1, and a forward of its own for mu > 1).
    """
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            num_samples=args.group_size, cuda_graph=args.cuda_graph)
    was_training = model.training
    model.eval()
    gen = generate(model, [p.ids for p in prompts], params, tok.stop_token_ids, tok.pad_token_id, generator,
                   decode=tok.decode, with_logprobs=False)
    model.train(was_training)
    lengths = gen.mask.sum(-1).tolist()  # one host sync for the whole batch
    tokens = gen.tokens.tolist()
    completions = [tokens[r][: lengths[r]] for r in range(len(lengths))]
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    rl_masks = [rl_mask(span_codes(tok, c, mode), mode) for c in completions]
    return Rollouts(completions, texts, rl_masks, sum(lengths))
