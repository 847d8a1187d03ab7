"""Rollouts: prompts -> G sampled completions each -> parsed, rewarded, advantaged, span-masked.

Also builds the teacher-forced SFT sequences (prompt + gold target), which share
their prompt with the rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.generate import SamplingParams, generate
from models.tokenizer import Tokenizer

from .data import DataError, Example
from .prompts import build_messages, choose_layout, render_chat, rl_mask, sft_target_ids, span_codes
from .rewards import batch_rewards, group_advantages


@dataclass
class Prompt:
    text: str  # the rendered chat prompt
    ids: list[int]
    example: Example
    truncated: bool = False  # the example's text was cut to fit max_prompt_tokens


def make_prompts(tok: Tokenizer, examples: list[Example], labels: list[str], mode: str, shots: list[Example],
                 max_tokens: int, truncate: bool = False, system_prompt: str | None = None,
                 template_system_prompt: bool = False) -> list[Prompt]:
    """Render each example's chat prompt. One longer than `max_tokens` tokens is an
    error naming the row, or with `truncate` keeps the head of the example's text
    that fits (the instructions, label list and worked examples stay whole).

    `system_prompt` replaces our instruction ("{labels}" becomes the label list). With
    `template_system_prompt` no system message is sent, so the chat template's own default
    system prompt applies, and the instruction opens the first user turn instead.
    The worked examples are earlier user/assistant turns unless the template would drop part
    of one (Qwen3 keeps only the text after `</think>` of earlier assistant turns); then they go
    inside the user turn as text, and if that drops them too the template is refused
    (`prompts.choose_layout`, decided once per template). Templates render with
    `enable_thinking=False` (`prompts.render_chat`).
    """
    shot_pairs = [(s.text, s.label) for s in shots]
    shots_in_user = choose_layout(tok, labels, mode, shot_pairs, system_prompt, template_system_prompt)

    def render(text: str) -> tuple[str, list[int]]:
        prompt = render_chat(tok, build_messages(text, labels, mode, shot_pairs, system=system_prompt,
                                                 template_system=template_system_prompt, shots_in_user=shots_in_user))
        return prompt, tok.encode(prompt)

    out = []
    for ex in examples:
        prompt, ids = render(ex.text)
        if len(ids) <= max_tokens:
            out.append(Prompt(prompt, ids, ex))
            continue
        if not truncate:
            raise DataError(f"{ex.source}: the prompt has {len(ids)} tokens, more than --max-prompt-tokens {max_tokens} "
                            "(raise it, or pass --long-prompts truncate to cut long texts)")
        _, offsets = tok.encode_with_offsets(ex.text)
        keep = len(offsets)
        while len(ids) > max_tokens and keep > 0:
            # Drop as many text tokens as the prompt is over; tokens can merge across
            # the cut, so re-render and repeat until it fits.
            keep = max(0, keep - (len(ids) - max_tokens))
            prompt, ids = render(ex.text[: offsets[keep - 1][1]] if keep else "")
        if len(ids) > max_tokens:
            raise DataError(f"{ex.source}: even with its text removed the prompt has {len(ids)} tokens, more than "
                            f"--max-prompt-tokens {max_tokens}: the instructions and worked examples alone are too long")
        out.append(Prompt(prompt, ids, ex, truncated=True))
    return out


@dataclass
class Rollouts:
    completions: list[list[int]]  # [B*G] generated ids (EOS included when emitted)
    texts: list[str]  # [B*G] decoded without special tokens
    parsed: list  # [B*G] prompts.Parsed
    rewards: torch.Tensor  # [B*G] float32
    advantages: torch.Tensor  # [B*G] float32
    rl_masks: list[list[bool]]  # [B*G] which completion tokens the RL loss sees
    num_tokens: int  # generated tokens in all


def sample_rollouts(model, tok: Tokenizer, prompts: list[Prompt], labels: list[str], mode: str, params: SamplingParams,
                    generator: torch.Generator, w_format: float, w_acc: float, scale_std: bool) -> Rollouts:
    G = params.num_samples
    gen = generate(model, [p.ids for p in prompts], params, tok.stop_token_ids, tok.pad_token_id, generator, decode=tok.decode)
    lengths = gen.mask.sum(-1).tolist()  # one host sync for the whole batch
    tokens = gen.tokens.tolist()
    completions = [tokens[r][: lengths[r]] for r in range(len(lengths))]
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    golds = [prompts[r // G].example.label for r in range(len(completions))]
    rewards, parsed = batch_rewards(texts, golds, labels, mode, w_format, w_acc)
    advantages = group_advantages(rewards, G, scale_std=scale_std)
    rl_masks = [rl_mask(span_codes(tok, c, mode), mode) for c in completions]
    return Rollouts(completions, texts, parsed, rewards, advantages, rl_masks, sum(lengths))


def sft_targets(tok: Tokenizer, prompts: list[Prompt], mode: str) -> tuple[list[list[int]], list[list[bool]]]:
    """The teacher-forced continuation of each prompt and its loss mask."""
    conts, masks = [], []
    for p in prompts:
        ids, mask = sft_target_ids(tok, p.text, p.example.label, mode)
        if mode == "sft":  # the label alone, then end the turn
            ids, mask = ids + [tok.eos_token_id], mask + [True]
        conts.append(ids)
        masks.append(mask)
    return conts, masks
