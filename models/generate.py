"""Batched sampling with a static KV cache: the rollout workhorse.

    prefill:  B prompts, left-padded to P tokens, run once -> cache rows [B]
    expand:   each prompt's cache row is copied to its G sample rows -> [B*G]
    decode:   one token per step for every row, writing k/v at slot P+s

The cache is allocated once for P + max_new_tokens slots. Each decode step
allocates no new cache memory and makes no host-device sync; whether every row
has finished is checked only every `check_every` steps (and stop strings, which
need the text, are checked then too).

Each sampled token's log-probability is returned under the temperature-scaled
distribution log_softmax(logits / T), before any top-k/top-p truncation: that is
exactly what the training forward computes for the same token, so the first
policy-gradient iteration sees importance ratios of exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .attention import AttnSpec
from .decoder import Decoder, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filtering
    num_samples: int = 1  # G completions per prompt
    stop_strings: tuple[str, ...] = ()
    check_every: int = 8  # steps between host checks (all finished? stop strings?)


@dataclass
class Generation:
    tokens: torch.Tensor  # [B*G, Tn] long; pad after a row stops
    mask: torch.Tensor  # [B*G, Tn] bool; True for generated tokens, EOS included
    logprobs: torch.Tensor  # [B*G, Tn] float32; 0 where mask is False
    prompt_index: torch.Tensor  # [B*G] long; row r belongs to prompt r // G
    finished: torch.Tensor  # [B*G] bool; stopped by EOS or a stop string


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [N, V] float32 -> sampled ids [N] without a host sync.

    Sampling by the exponential race (argmax of p / E with E ~ Exp(1)) picks index
    i with probability p_i, like torch.multinomial, but stays on the device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop = (probs.cumsum(dim=-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids [B, P] and valid mask [B, P], pads on the left."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            valid[b, P - len(p) :] = True
    return ids.to(device), valid.to(device)


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_token_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> Generation:
    """Sample `params.num_samples` completions for each prompt (token-id lists).

    `decode` (ids -> text) is needed only for `params.stop_strings`.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if params.stop_strings and decode is None:
        raise ValueError("generate: stop_strings need a decode function")
    device = model.lm_head.weight.device
    G, Tn = params.num_samples, params.max_new_tokens
    ids, valid = left_pad(prompts, pad_id, device)  # [B, P]
    B, P = ids.shape
    N = B * G

    # Prefill once per prompt. Pad queries may attend to themselves only, which
    # keeps their softmax finite without letting real tokens see them.
    cache = KVCache(model.config, B, P + Tn, model.lm_head.weight.dtype, device)
    cache.slots = torch.arange(P, device=device)
    cache.kv_len = P
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask = causal & (valid[:, None, :] | torch.eye(P, dtype=torch.bool, device=device))  # [B, P, P]
    hidden = model.hidden_states(ids, positions, AttnSpec("mask", mask[:, None]), cache)
    logits = model.lm_head(hidden[:, -1]).float()  # [B, V]

    # Each prompt's cache row now serves its G samples.
    cache = cache.repeat_rows(G)
    logits = logits.repeat_interleave(G, dim=0)  # [N, V]
    key_valid = torch.ones(N, P + Tn, dtype=torch.bool, device=device)
    key_valid[:, :P] = valid.repeat_interleave(G, dim=0)
    next_pos = valid.sum(-1).repeat_interleave(G)[:, None]  # [N, 1]
    stop_ids = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)

    tokens = torch.full((N, Tn), pad_id, dtype=torch.long, device=device)
    gen_mask = torch.zeros((N, Tn), dtype=torch.bool, device=device)
    logprobs = torch.zeros((N, Tn), dtype=torch.float32, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    cache.slots = slot
    temp = params.temperature if params.temperature > 0 else 1.0
    steps = 0
    for s in range(Tn):
        tok = sample_tokens(logits, params.temperature, params.top_p, params.top_k, generator)
        lp = torch.log_softmax(logits / temp, dim=-1).gather(-1, tok[:, None])[:, 0]
        live = ~finished
        tokens[:, s] = torch.where(live, tok, pad_id)
        gen_mask[:, s] = live
        logprobs[:, s] = torch.where(live, lp, 0.0)
        finished |= live & torch.isin(tok, stop_ids)
        steps = s + 1
        if steps == Tn:
            break
        if steps % params.check_every == 0:
            if params.stop_strings:
                _apply_stop_strings(tokens, gen_mask, logprobs, finished, steps, params.stop_strings, decode, pad_id)
            if bool(finished.all()):
                break
        slot.fill_(P + s)
        cache.kv_len = P + s + 1
        spec = AttnSpec("mask", key_valid[:, None, None, : P + s + 1])
        hidden = model.hidden_states(tokens[:, s : s + 1], next_pos, spec, cache)
        logits = model.lm_head(hidden[:, -1]).float()
        next_pos += 1
    if params.stop_strings:
        _apply_stop_strings(tokens, gen_mask, logprobs, finished, steps, params.stop_strings, decode, pad_id)
    prompt_index = torch.arange(B, device=device).repeat_interleave(G)
    return Generation(tokens[:, :steps], gen_mask[:, :steps], logprobs[:, :steps], prompt_index, finished)


def _apply_stop_strings(tokens, gen_mask, logprobs, finished, steps, stop_strings, decode, pad_id) -> None:
    """End rows whose text contains a stop string: keep tokens up to the one completing it."""
    rows = (~finished).nonzero()[:, 0].tolist()
    host_tokens = tokens[:, :steps].tolist()
    host_mask = gen_mask[:, :steps].tolist()
    for r in rows:
        ids = [t for t, m in zip(host_tokens[r], host_mask[r]) if m]
        if not any(s in decode(ids) for s in stop_strings):
            continue
        end = next(i for i in range(1, len(ids) + 1) if any(s in decode(ids[:i]) for s in stop_strings))
        tokens[r, end:steps] = pad_id
        gen_mask[r, end:steps] = False
        logprobs[r, end:steps] = 0.0
        finished[r] = True
