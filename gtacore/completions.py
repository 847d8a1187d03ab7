"""The completion format: the target of each mode, a strict parser and token span codes. The
rewards and group advantages computed from parsed completions: gtacore.rewards.

Modes and the completion each asks for (docs/method.md, "Output format" and "Baselines"):

    gta:   <guess>LABEL</guess><think>free text</think><answer>LABEL</answer>
    grpo:  <think>free text</think><answer>LABEL</answer>
    sft:   LABEL

Parsing rules (`parse_completion`), all ours where the paper is silent:
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

Span codes (`span_codes`) label every completion token for the losses (docs/method.md, "Spans").
GUESS covers the whole guess block `<guess>y</guess>`, tags included: exactly the text the SFT
target teaches, so that `rl_mask` keeps every RL gradient off it from the codes alone. A guess
never closed has no GUESS span: nothing marks where it would end, and painting the rest of the
completion GUESS would hide its think and answer from the RL loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("gta", "sft", "grpo")
PROMPT, GUESS, THINK, ANSWER, OTHER = 0, 1, 2, 3, 4
TAGS = {"guess": ("<guess>", "</guess>"), "think": ("<think>", "</think>"), "answer": ("<answer>", "</answer>")}
_PARTS = {"gta": ("guess", "think", "answer"), "grpo": ("think", "answer")}

def check_mode(mode: str) -> None:
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
    check_mode(mode)
    if mode == "sft":
        return label
    think = f"The wording and tone of the text fit {label} best"
    if mode == "gta":
        return f"<guess>{label}</guess><think>{think}, so the guess holds.</think><answer>{label}</answer>"
    return f"<think>{think}.</think><answer>{label}</answer>"


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
    check_mode(mode)
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
    check_mode(mode)
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

    docs/method.md: "RL loss: on THINK, ANSWER and OTHER tokens after </guess>. GUESS tokens are
    left out of the RL loss". The guess tags are GUESS (module docstring), so the guess block, tags included, is
    trained by SFT only. Text before `<guess>` is OTHER and stays in the RL loss (ours): it is
    the policy's own format error and the reward should reach it. In grpo mode every
    completion token is in the RL loss.
    """
    if mode not in _PARTS:
        raise ValueError(f"mode {mode!r} has no RL loss")
    return [c != PROMPT and c != GUESS for c in codes]
