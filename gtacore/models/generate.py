"""Batched sampling with a static KV cache: the rollout workhorse.

    prefill:           B prompts, left-padded to P tokens, run once -> cache rows [B], logits [B, V]
    expand:            each prompt's cache row is copied to its G sample rows -> [N = B*G]
    decode_one_token:  one token for every row, its k/v written at slot P+s -> logits [N, V]
    generate:          the loop: sample, record, decode; now and then, check for the end

The cache holds P + Tn slots in the compute dtype (bf16 under bf16 autocast), allocated before
the loop (B rows, then their N copies);
a decode step allocates no cache memory and makes no host-device sync. Whether every
row has finished (and stop strings, which need the text) is checked every `check_every` steps.

With `with_logprobs`, each sampled token's log-prob is returned under softmax(logits / T),
before any top-k/top-p truncation: exactly what the training forward computes, so the
first policy-gradient iteration sees importance ratios of exactly 1. It is computed as
logits[tok] / T - logsumexp(logits / T) = log_softmax(logits / T)[tok], never writing [N, V].
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
    cuda_graph: bool = False  # on CUDA, replay the decode step as a captured CUDA graph


@dataclass
class Generation:
    tokens: torch.Tensor  # [B*G, Tn] long; pad after a row stops
    mask: torch.Tensor  # [B*G, Tn] bool; True for generated tokens, EOS included
    logprobs: torch.Tensor | None  # [B*G, Tn] float32, 0 where mask is False; None without with_logprobs
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


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a forward computes in: autocast's where it is on (bf16-mixed), else the weights'."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


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


def prefill(model: Decoder, ids: torch.Tensor, valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Left-padded prompts ids [B, P] (valid [B, P] bool) -> k/v in cache slots 0..P-1 and
    the last position's logits [B, V] float32. Positions count real tokens only; pad
    queries attend to themselves only, which keeps their softmax finite unseen.
    """
    P = ids.shape[1]
    cache.slots = torch.arange(P, device=ids.device)
    cache.kv_len = P
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
    mask = causal & (valid[:, None, :] | torch.eye(P, dtype=torch.bool, device=ids.device))  # [B, P, P]
    hidden = model.hidden_states(ids, positions, AttnSpec("mask", mask[:, None]), cache)  # [B, P, D]
    return model.lm_head(hidden[:, -1]).float()


def decode_one_token(model: Decoder, token: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One step for every row: token [N, 1] long at positions [N, 1] -> next logits [N, V] float32.

    Writes k/v at `cache.slots` ([1] long) and attends to the first `cache.kv_len` slots
    where key_valid [N, S] is True. No host sync, no branch on tensor values. `generate` keeps
    kv_len at the whole cache and marks written slots in key_valid, so every step has the
    same shapes and reads the same buffers: the unit a CUDA graph captures.
    """
    spec = AttnSpec("mask", key_valid[:, None, None, : cache.kv_len])  # [N, 1, 1, kv_len]
    hidden = model.hidden_states(token, positions, spec, cache)  # [N, 1, D]
    return model.lm_head(hidden[:, -1]).float()


@torch.no_grad()
def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop_token_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    decode: Callable[[list[int]], str] | None = None,
    with_logprobs: bool = True,
) -> Generation:
    """Sample `params.num_samples` completions for each prompt (token-id lists).

    `decode` (ids -> text) is needed only for `params.stop_strings`. With `with_logprobs`
    False, Generation.logprobs is None and the tokens are the same. Greedy's are under T = 1.
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
    cache = KVCache(model.config, B, P + Tn, compute_dtype(model.lm_head.weight), device)
    logits = prefill(model, ids, valid, cache)  # [B, V]

    # Each prompt's cache row now serves its G samples. The decode step's inputs are buffers
    # updated in place (token, positions, slot, key_valid) and it attends to all P + Tn slots,
    # the unwritten ones masked: one shape for every step.
    cache = cache.repeat_rows(G)
    cache.kv_len = P + Tn
    logits = logits.repeat_interleave(G, dim=0)  # [N, V]
    key_valid = torch.zeros(N, P + Tn, dtype=torch.bool, device=device)  # [N, S]: slots written so far
    key_valid[:, :P] = valid.repeat_interleave(G, dim=0)
    positions = valid.sum(-1).repeat_interleave(G)[:, None]  # [N, 1]: the next token's position
    cache.slots = torch.zeros(1, dtype=torch.long, device=device)  # [1]: the next token's slot
    token = torch.zeros(N, 1, dtype=torch.long, device=device)  # [N, 1]: the token being decoded
    step = _decode_step(model, token, positions, key_valid, cache, params.cuda_graph)
    stop_ids = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)

    tokens = torch.full((N, Tn), pad_id, dtype=torch.long, device=device)
    gen_mask = torch.zeros((N, Tn), dtype=torch.bool, device=device)
    logprobs = torch.zeros((N, Tn), dtype=torch.float32, device=device) if with_logprobs else None
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    temp = params.temperature if params.temperature > 0 else 1.0
    steps = 0
    for s in range(Tn):
        tok = sample_tokens(logits, params.temperature, params.top_p, params.top_k, generator)  # [N]
        live = ~finished
        tokens[:, s] = torch.where(live, tok, pad_id)
        gen_mask[:, s] = live
        if logprobs is not None:  # = log_softmax(logits / T).gather(tok), without its [N, V] output
            lp = logits.gather(-1, tok[:, None])[:, 0] / temp - torch.logsumexp(logits / temp, dim=-1)  # [N]
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
        cache.slots.fill_(P + s)
        key_valid.index_fill_(1, cache.slots, True)
        token.copy_(tokens[:, s : s + 1])
        logits = step()  # [N, V]
        positions += 1
    if params.stop_strings:
        _apply_stop_strings(tokens, gen_mask, logprobs, finished, steps, params.stop_strings, decode, pad_id)
    prompt_index = torch.arange(B, device=device).repeat_interleave(G)
    logprobs = logprobs[:, :steps] if with_logprobs else None
    return Generation(tokens[:, :steps], gen_mask[:, :steps], logprobs, prompt_index, finished)


def _decode_step(model, token, positions, key_valid, cache, cuda_graph: bool) -> Callable[[], torch.Tensor]:
    """The decode step over generate's buffers: eager, or on CUDA a captured graph replayed.

    A graph replays the kernels it recorded on the same memory, so it needs the static step and
    weights already in the compute dtype: under autocast with fp32 weights it would record the
    weight casts too (three times the weight bytes per step), so that case stays eager."""
    def eager():
        return decode_one_token(model, token, positions, key_valid, cache)

    weight = model.lm_head.weight
    if not (cuda_graph and weight.is_cuda and compute_dtype(weight) == weight.dtype):
        return eager
    captured = []  # (graph, its logits buffer), made at the first step, when the buffers hold real inputs

    def replay():
        if not captured:
            side = torch.cuda.Stream()  # warm up (allocator, kernel choices) off the capture stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager()  # writes this step's k/v into its slot: the replay writes the same
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured.append((graph, eager()))
        graph, logits = captured[0]
        graph.replay()
        return logits

    return replay


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
        if logprobs is not None:
            logprobs[r, end:steps] = 0.0
        finished[r] = True
