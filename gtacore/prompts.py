"""The output format: prompts that ask for it, SFT targets, a strict parser, and token span codes.

Modes and the completion each asks for (GTA.md, "Output format" and "Baselines"):

    gta:   <guess>LABEL</guess><think>free text</think><answer>LABEL</answer>
    grpo:  <think>free text</think><answer>LABEL</answer>
    sft:   LABEL

Parsing rules (`parse_completion`), all ours where GTA.md is silent:
- Whitespace (Python's str.isspace) is allowed before the first tag, between parts and
  after `</answer>`; any other text outside the tags breaks the format.
- Each of the mode's tags appears exactly once, in order; the grpo format has no guess tags.
  A tag inside another part's content is therefore a repeated tag: nesting breaks the format.
- guess and answer must equal a label exactly after stripping whitespace. Case counts:
  "Joy" is not "joy". The prompt lists the labels verbatim, and a lenient match would let
  accuracy count answers the format reward rejects.
- think must hold some non-whitespace text: an empty think is guess-then-answer, the shortcut
  GTA is meant to replace, and rewarding it would teach the policy to skip the reflection.
- The caller decodes completions with skip_special_tokens=True, so EOS is not in the text;
  "nothing after </answer> but EOS" becomes "nothing but whitespace".
- Fields hold stripped contents even when the format is broken, if the part is unambiguous
  (exactly one open and one close tag, in order): accuracy is judged on the answer alone.

Span codes (`span_codes`) label every completion token for the losses (GTA.md, "Spans").
GUESS covers the whole guess block `<guess>y</guess>`, tags included: exactly the text the SFT
target teaches, so that `rl_mask` keeps every RL gradient off it from the codes alone. A guess
never closed has no GUESS span: nothing marks where it would end, and painting the rest of the
completion GUESS would hide its think and answer from the RL loss.

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

from models.tokenizer import TokenizerError

MODES = ("gta", "sft", "grpo")
PROMPT, GUESS, THINK, ANSWER, OTHER = 0, 1, 2, 3, 4
TAGS = {"guess": ("<guess>", "</guess>"), "think": ("<think>", "</think>"), "answer": ("<answer>", "</answer>")}
_PARTS = {"gta": ("guess", "think", "answer"), "grpo": ("think", "answer")}

_ASK = "Classify the text into exactly one of these labels: {labels}.\n"
_SYSTEM = {
    "gta": _ASK + "Reply in exactly this format: <guess>LABEL</guess><think>REASONING</think><answer>LABEL</answer>\n"
    "First give a quick guess, then think about the text and whether the guess is right, then give your final "
    "answer. Write each LABEL exactly as listed and nothing after </answer>.",
    "grpo": _ASK + "Reply in exactly this format: <think>REASONING</think><answer>LABEL</answer>\n"
    "First think about the text, then give your final answer. Write LABEL exactly as listed and nothing after </answer>.",
    "sft": _ASK + "Reply with the label only, exactly as listed.",
}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def check_labels(labels: list[str]) -> None:
    """Labels must be distinct, non-empty, unpadded and tag-free, or the parser could never match them."""
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be a non-empty list of distinct strings, got {labels!r}")
    for label in labels:
        if not label or label != label.strip() or any(t in label for pair in TAGS.values() for t in pair):
            raise ValueError(f"label {label!r} is empty, has surrounding whitespace or contains a format tag")


def format_target(label: str, mode: str) -> str:
    """The ideal completion for `label`: the assistant turn of a worked example.

    The think sentence is generic on purpose (it only names the label): it shows the
    structure without putting words about a specific text in the policy's mouth.
    """
    _check_mode(mode)
    if mode == "sft":
        return label
    think = f"The wording and tone of the text fit {label} best"
    if mode == "gta":
        return f"<guess>{label}</guess><think>{think}, so the guess holds.</think><answer>{label}</answer>"
    return f"<think>{think}.</think><answer>{label}</answer>"


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
    _check_mode(mode)
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


@dataclass(frozen=True)
class Parsed:
    guess: str | None  # stripped contents; None when absent, ambiguous or not in this mode
    think: str | None
    answer: str | None
    format_ok: bool


_STRUCTURE = {
    mode: re.compile(r"\s*" + r"\s*".join(re.escape(TAGS[p][0]) + "(.*?)" + re.escape(TAGS[p][1]) for p in parts) + r"\s*", re.S)
    for mode, parts in _PARTS.items()
}


def _unique_part(text: str, part: str) -> str | None:
    open_tag, close_tag = TAGS[part]
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    start, end = text.index(open_tag) + len(open_tag), text.index(close_tag)
    return text[start:end].strip() if start <= end else None


def parse_completion(text: str, labels: list[str], mode: str) -> Parsed:
    """Parse a decoded completion (special tokens skipped) by the rules in the module docstring."""
    _check_mode(mode)
    if mode == "sft":
        answer = text.strip()
        return Parsed(None, None, answer, answer in labels)
    parts = _PARTS[mode]
    fields = {p: _unique_part(text, p) for p in parts}
    tags_once = all(text.count(t) == int(p in parts) for p, pair in TAGS.items() for t in pair)  # grpo: no guess tags
    format_ok = (
        tags_once
        and _STRUCTURE[mode].fullmatch(text) is not None
        and all(fields[p] in labels for p in parts if p != "think")
        and bool(fields["think"])
    )
    return Parsed(fields.get("guess"), fields["think"], fields["answer"], format_ok)


def _char_codes(text: str, mode: str) -> list[int]:
    """A span code per character of a decoded completion; defined for any text, well-formed or not.

    Each part is the first open tag of its kind up to the first matching close tag after it
    (think and answer: or to the limit if unclosed; an unclosed guess is no part, see the module
    docstring). Nothing after the first `</answer>` belongs to a part. Parts are painted THINK,
    ANSWER, then GUESS, so that on overlap (nested tags) guess wins.
    """
    codes = [OTHER] * len(text)
    if mode == "sft":  # the answer is the stripped text
        start, end = len(text) - len(text.lstrip()), len(text.rstrip())
        codes[start:end] = [ANSWER] * max(end - start, 0)
        return codes
    close = text.find(TAGS["answer"][1])
    limit = len(text) if close < 0 else close + len(TAGS["answer"][1])
    for part, code in (("think", THINK), ("answer", ANSWER), ("guess", GUESS)):
        if part not in _PARTS[mode]:
            continue
        open_tag, close_tag = TAGS[part]
        start = text.find(open_tag, 0, limit)
        if start < 0:
            continue
        end = text.find(close_tag, start + len(open_tag), limit)
        if part == "guess":  # the whole block, tags included
            if end < 0:
                continue
            end += len(close_tag)
        else:
            start, end = start + len(open_tag), (limit if end < 0 else end)
        codes[start:end] = [code] * (end - start)
    return codes


def _token_char_ranges(tokenizer, ids: list[int], windowed: bool) -> tuple[str, list[tuple[int, int]]]:
    """Decode `ids` incrementally: (text, each token's [start, end) in text).

    A token that ends inside a multi-byte character decodes to a trailing U+FFFD; it waits,
    and the run of tokens that completes the character shares the run's character range.
    Windowed decoding (vLLM's incremental detokenizer) decodes from the previous emitted run
    only, O(T) in all; the unwindowed form decodes whole prefixes, O(T^2), as a fallback.
    """
    ranges: list[tuple[int, int]] = []
    pieces: list[str] = []
    pos = window = read = 0
    for j in range(len(ids)):
        before = tokenizer.decode(ids[window:read])
        now = tokenizer.decode(ids[window : j + 1])
        if len(now) > len(before) and (not now.endswith("\ufffd") or j + 1 == len(ids)):
            pieces.append(now[len(before) :])
            ranges += [(pos, pos + len(pieces[-1]))] * (j + 1 - read)
            pos += len(pieces[-1])
            window, read = (read if windowed else 0), j + 1
    ranges += [(pos, pos)] * (len(ids) - read)  # trailing tokens that decode to nothing
    return "".join(pieces), ranges


def _is_special(tokenizer, token_id: int) -> bool:
    """A token that skip_special_tokens removes: it has text alone and none when skipped."""
    return tokenizer.decode([token_id]) != "" and tokenizer.decode([token_id], skip_special_tokens=True) == ""


def span_codes(tokenizer, completion_ids: list[int], mode: str) -> list[int]:
    """One span code per completion token, consistent with decode(ids, skip_special_tokens=True).

    Special tokens (EOS, any skipped token) carry no text and are OTHER. A token whose
    characters span several codes takes the highest of GUESS > ANSWER > THINK > OTHER: a token
    holding any guess character must never reach the RL loss, and a token holding answer or
    think characters is content, not a tag. Tokens after the first `</answer>` are OTHER.
    Real tokenizers do merge across parts: SmolLM2 writes `</guess><think>` as `</`, `guess`,
    `><`, `think`, `>`; `><` is GUESS, so the `<` of `<think>` gets no RL gradient.
    """
    _check_mode(mode)
    special = {i: _is_special(tokenizer, i) for i in set(completion_ids)}
    plain = [i for i in completion_ids if not special[i]]
    expected = tokenizer.decode(completion_ids, skip_special_tokens=True)
    text, ranges = _token_char_ranges(tokenizer, plain, windowed=True)
    if text != expected:
        text, ranges = _token_char_ranges(tokenizer, plain, windowed=False)
    if text != expected:
        raise ValueError("span_codes: this tokenizer's decoding is not prefix-stable; token character ranges are undefined")
    chars = _char_codes(text, mode)
    rank = {OTHER: 0, THINK: 1, ANSWER: 2, GUESS: 3}
    plain_codes = iter([max((chars[c] for c in range(a, b)), key=rank.get, default=OTHER) for a, b in ranges])
    return [OTHER if special[i] else next(plain_codes) for i in completion_ids]


def rl_mask(codes: list[int], mode: str) -> list[bool]:
    """Which completion tokens the RL loss sees: all but PROMPT and the guess block.

    GTA.md: "RL loss on THINK, ANSWER and OTHER tokens after </guess>; GUESS tokens are masked
    out". The guess tags are GUESS (module docstring), so the guess block, tags included, is
    trained by SFT only. Text before `<guess>` is OTHER and stays in the RL loss (ours): it is
    the policy's own format error and the reward should reach it. In grpo mode every
    completion token is in the RL loss.
    """
    if mode not in _PARTS:
        raise ValueError(f"mode {mode!r} has no RL loss")
    return [c != PROMPT and c != GUESS for c in codes]
