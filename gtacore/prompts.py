"""Prompts: the chat messages that ask for the format, rendered through the checkpoint's own
template, and the SFT targets that continue them.

Chat templates (ours; `render_chat`, `choose_layout`):
- We always pass `enable_thinking=False`. Templates that do not know the variable ignore it;
  Qwen3's then closes an empty `<think>\n\n</think>\n\n` block in the generation prompt, so the
  model's first sampled token starts our structure rather than a free-form reasoning block. The
  grpo format's own `<think>` follows that block; the parser only ever sees the completion.
- A template may rewrite earlier assistant turns: Qwen3's keeps only the text after `</think>`,
  so a gta worked example would reach the model as `<answer>y</answer>` alone. The rendered
  prompt must hold every worked example's whole target; when the examples as earlier turns lose
  any, they go inside the user turn as text instead, and when that loses them too it is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from gtacore.models.tokenizer import Tokenizer, TokenizerError

from .completions import TAGS, check_labels, check_mode, format_target
from .data import DataError, Example

_ASK = "Classify the text into exactly one of these labels: {labels}.\n"
_SYSTEM = {
    "gta": _ASK + "Reply in exactly this format: <guess>LABEL</guess><think>REASONING</think><answer>LABEL</answer>\n"
    "First give a quick guess, then think about the text and whether the guess is right, then give your final "
    "answer. Write each LABEL exactly as listed and nothing after </answer>.",
    "grpo": _ASK + "Reply in exactly this format: <think>REASONING</think><answer>LABEL</answer>\n"
    "First think about the text, then give your final answer. Write LABEL exactly as listed and nothing after </answer>.",
    "sft": _ASK + "Reply with the label only, exactly as listed.",
}


def build_messages(
    text: str, labels: list[str], mode: str, shots: Sequence[tuple[str, str]] = (), system: str | None = None,
    *, template_system: bool = False, shots_in_user: bool = False,
) -> list[dict]:
    """Chat messages for one question: the instruction, k worked examples, then the question.

    Layouts: by default a system message holds the instruction and each worked example is an
    earlier user/assistant turn pair. `shots_in_user` puts the worked examples, each a text with
    its full reply, as text into the one user message before the question (for templates that
    rewrite assistant turns; `choose_layout` decides). `template_system` sends no system message,
    so the template's own default system prompt applies, and opens the first user turn with the
    instruction. `system` replaces the default instruction; "{labels}" in it becomes the
    comma-separated label list (str.replace, not str.format, so braces elsewhere are safe).
    """
    check_mode(mode)
    check_labels(labels)
    instruction = (_SYSTEM[mode] if system is None else system).replace("{labels}", ", ".join(labels))
    for _, shot_label in shots:
        if shot_label not in labels:
            raise ValueError(f"worked example label {shot_label!r} is not in the label set")
    question = f"Text: {text}"
    if shots_in_user and shots:
        examples = "\n\n".join(f"Example {i}\nText: {t}\nReply: {format_target(y, mode)}"
                                 for i, (t, y) in enumerate(shots, 1))
        turns = [f"Worked examples, each a text and the exact reply it gets:\n\n{examples}\n\n"
                 f"Now reply the same way to this text.\n{question}"]
    else:
        turns = [turn for t, y in shots for turn in (f"Text: {t}", format_target(y, mode))] + [question]
    messages = [{"role": "assistant" if i % 2 else "user", "content": turn} for i, turn in enumerate(turns)]
    if template_system:
        messages[0]["content"] = f"{instruction}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": instruction}, *messages]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """Prompt text through the checkpoint's own chat template, ending with the assistant header
    (for Qwen3, then an empty think block: see the module docstring)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of `render_chat`."""
    return tokenizer.encode(render_chat(tokenizer, messages))


def _lost_targets(rendered: str, messages: list[dict], targets: list[str]) -> list[str]:
    """Worked-example targets that `rendered` holds less often than `messages` do, each with
    its tagged parts that are missing altogether.

    Counting, not just finding, catches a template that drops only some assistant turns, and an
    sft target (the bare label) that the label list in the instruction would otherwise supply.
    """
    lost = []
    for target in dict.fromkeys(targets):
        if rendered.count(target) < sum(m["content"].count(target) for m in messages):
            parts = [m.group(0) for m in re.finditer(r"<(\w+)>.*?</\1>", target, re.S)] or [target]
            missing = [p for p in parts if p not in rendered]
            note = ("all of it" if len(missing) == len(parts) else f"missing {', '.join(map(repr, missing))}" if missing
                    else "not whole where it was sent")
            lost.append(f"{target!r} ({note})")
    return lost


def choose_layout(tokenizer, labels: list[str], mode: str, shots: Sequence[tuple[str, str]], system: str | None = None,
                  template_system: bool = False) -> bool:
    """Whether the worked examples must go inside the user turn: `build_messages(shots_in_user=...)`.

    Renders a probe question with the examples as earlier turns; when the prompt lacks any
    example's whole target, renders them inside the user turn; when that lacks one too, raises
    TokenizerError naming the tokenizer folder and what was lost. Decided once per tokenizer,
    mode, labels, examples and system settings (cached): it depends on the template, not on the question.
    """
    return _layout(tokenizer, tuple(labels), mode, tuple(map(tuple, shots)), system, template_system)


@lru_cache(maxsize=64)
def _layout(tokenizer, labels: tuple, mode: str, shots: tuple, system: str | None, template_system: bool) -> bool:
    if not shots:
        return False
    targets = [format_target(y, mode) for _, y in shots]
    lost = {}
    for shots_in_user in (False, True):
        messages = build_messages("", list(labels), mode, shots, system, template_system=template_system,
                                  shots_in_user=shots_in_user)
        lost[shots_in_user] = _lost_targets(render_chat(tokenizer, messages), messages, targets)
        if not lost[shots_in_user]:
            return shots_in_user
    raise TokenizerError(
        f"{getattr(tokenizer, 'path', 'tokenizer')}: the chat template drops part of the worked examples: as earlier "
        f"assistant turns it loses {'; '.join(lost[False])}; inside the user turn it loses {'; '.join(lost[True])}. "
        "Use a tokenizer whose template keeps them, or --shots 0")


def sft_target(label: str, mode: str) -> str:
    """Teacher-forced continuation of the SFT loss: gta `<guess>y</guess>`, sft `y`.

    In sft mode the caller appends the EOS id (with loss) so the model learns to stop.
    """
    if mode == "gta":
        return f"<guess>{label}</guess>"
    if mode == "sft":
        return label
    raise ValueError(f"mode {mode!r} has no SFT target")


def sft_target_ids(
    tokenizer, prompt_text: str, label: str, mode: str, sft_on_open_tag: bool = False
) -> tuple[list[int], list[bool]]:
    """Continuation ids of `sft_target(label, mode)` after `prompt_text`, and the loss mask.

    The loss covers every token carrying a character of the label or of `</guess>`. The
    opening `<guess>` is excluded by default (ours): it is fixed boilerplate that the worked
    examples already teach, and the SFT signal should be about the label. A token that merges
    the opening tag with label characters carries the label, so it is in the loss.

    Tokenization: the SFT sequence is render_prompt ids + these ids, and the prompt ids must be
    the very ones the rollout conditions on. We encode prompt + target jointly and keep the
    tokens after the prompt when the joint prompt tokens equal encode(prompt_text): that is
    the tokenization the model saw in pretraining, and it avoids the spurious prefix space a
    SentencePiece-style tokenizer adds to a string encoded on its own. When BPE merges or
    pre-tokenization cross the boundary (GPT-2's whitespace rule splits a trailing "\\n\\n"
    differently before "<"), the joint prompt differs from the rollout prompt; we then encode
    the target alone, provided it decodes to exactly the target after the prompt.
    """
    target = sft_target(label, mode)
    loss_from = 0 if (mode == "sft" or sft_on_open_tag) else len(TAGS["guess"][0])
    loss_to = len(target)
    # In gta mode the rollout continues `</guess>` with `<think>`, and BPE often merges
    # across that boundary (SmolLM2: `></`-style tokens such as `><`). Tokenize the target
    # with its natural right context, so the SFT loss teaches the tokens the policy
    # samples; without it the model learns a lone `>` and then ends the turn.
    target += TAGS["think"][0] if mode == "gta" else ""
    prompt_ids = tokenizer.encode(prompt_text)
    joint, offsets = tokenizer.encode_with_offsets(prompt_text + target)
    n, shift = len(prompt_ids), len(prompt_text)
    if joint[:n] == prompt_ids and len(joint) > n and offsets[n][0] >= shift:
        ids, spans = joint[n:], [(a - shift, b - shift) for a, b in offsets[n:]]
    else:
        ids, spans = tokenizer.encode_with_offsets(target)
        if tokenizer.decode(prompt_ids + ids) != tokenizer.decode(prompt_ids) + target:
            raise ValueError(f"cannot tokenize the SFT target {target!r} after this prompt: the joint encoding changes "
                             "the prompt's tokens and the separate one changes the target's text")
    mask = [b > loss_from and a < loss_to for a, b in spans]
    keep = max(i for i, m in enumerate(mask) if m) + 1  # drop context tokens past the loss
    return ids[:keep], mask[:keep]


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


def print_dry_run(tok: Tokenizer, labels: list[str], mode: str, prompt: Prompt) -> None:
    """What the model sees (`train.py --dry-run`): the first training prompt exactly as its token
    ids decode (special tokens included), the SFT target and which of its tokens carry the loss."""
    print(f"labels ({len(labels)}): {', '.join(labels)}")
    print(f"mode: {mode}; first training example: {prompt.example.source}"
          + (" (text truncated to fit --max-prompt-tokens)" if prompt.truncated else ""))
    print(f"--- prompt: {len(prompt.ids)} tokens, as the model receives them ---")
    print(tok.decode(prompt.ids))
    print("--- end of prompt; the model's first generated token follows ---")
    if mode in ("gta", "sft"):
        (ids,), (mask,) = sft_targets(tok, [prompt], mode)
        print(f"SFT target ({len(ids)} tokens): {tok.decode(ids)!r}")
        print("SFT loss on: " + " ".join(repr(tok.decode([t])) for t, m in zip(ids, mask) if m))
