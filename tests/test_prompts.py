"""Prompts, SFT targets, the strict parser and span codes, on tokenizers that split the tags differently."""

import pytest

from gtacore.completions import ANSWER, GUESS, OTHER, PROMPT, THINK, Parsed, format_target, parse_completion, rl_mask, span_codes
from gtacore.prompts import build_messages, render_prompt, sft_target, sft_target_ids
from gtacore.models.tokenizer import Tokenizer
from tokenizer_fixtures import CHATML_BLANK_LINE, write_tokenizer

LABELS = ["joy", "sadness", "anger", "fear", "love", "surprise"]
THINKS = ["the writer sounds glad about the news", "nothing here is sad, the guess was wrong", "maybe <guess>fear</guess> no",
          "とても😀嬉しい", "a long pause, then relief"]
SENTENCES = ["I finally got the job and I can't stop smiling.", "The rain never ends and I miss home.",
             "Why would anyone cancel without telling me?", "Wait, the package arrived a week early?", "Sure! Hope this helps."]
CORPUS = ([f"<guess>{g}</guess><think>{t}</think><answer>{a}</answer>" for g in LABELS for t in THINKS for a in LABELS[:3]]
          + [format_target(label, "grpo") for label in LABELS] + SENTENCES * 4 + ["Text: 喜び 悲しみ\n"] * 3
          # every character a prompt uses: the metaspace tokenizer has no byte fallback
          + [m["content"] for mode in ("gta", "grpo", "sft") for m in build_messages("I miss home.", LABELS, mode)]
          + ["system\nYou are a helpful assistant.", "user", "assistant"])


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {
        "bpe300": Tokenizer(write_tokenizer(root / "a", CORPUS, 300)),
        "noregex400": Tokenizer(write_tokenizer(root / "b", CORPUS, 400, "bytelevel-noregex")),
        "metaspace": Tokenizer(write_tokenizer(root / "c", CORPUS, 350, "metaspace")),
        "added-think": Tokenizer(write_tokenizer(root / "d", CORPUS, 500, added_tokens=("<think>", "</think>"))),
    }


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("mode", ["gta", "grpo", "sft"])
def test_messages_list_labels_and_shots_in_order(mode):
    shots = [("Best day ever!", "joy"), ("I lost my keys again.", "anger")]
    messages = build_messages("It is raining.", LABELS, mode, shots)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert all(label in system for label in LABELS)
    assert ("<guess>" in system) == (mode == "gta") and ("<think>" in system) == (mode != "sft")
    assert "Best day ever!" in messages[1]["content"] and "I lost my keys again." in messages[3]["content"]
    assert "It is raining." in messages[5]["content"]
    for turn, (_, label) in zip(messages[2::2], shots):
        assert turn["content"] == format_target(label, mode)
        parsed = parse_completion(turn["content"], LABELS, mode)  # the shots must model a perfect completion
        assert parsed.format_ok and parsed.answer == label and parsed.guess == (label if mode == "gta" else None)
    custom = build_messages("x", LABELS, mode, system="Pick {labels}. {not a placeholder}")
    assert custom[0]["content"] == "Pick joy, sadness, anger, fear, love, surprise. {not a placeholder}"


def test_prompt_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        build_messages("x", LABELS, "dpo")
    with pytest.raises(ValueError, match="not in the label set"):
        build_messages("x", LABELS, "gta", [("y", "boredom")])
    for bad in ([], ["joy", "joy"], ["joy", " fear"], ["<answer>"], [""]):
        with pytest.raises(ValueError):
            build_messages("x", bad, "gta")
    with pytest.raises(ValueError, match="no SFT target"):
        sft_target("joy", "grpo")
    with pytest.raises(ValueError, match="no RL loss"):
        rl_mask([ANSWER], "sft")


def test_render_prompt(toks):
    tok = toks["bpe300"]
    messages = build_messages("Why would anyone cancel?", LABELS, "gta", [("Best day ever!", "joy")])
    ids = render_prompt(tok, messages)
    assert ids == tok.encode(tok.apply_chat_template(messages))
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- parser

OK = "<guess>joy</guess><think>glad words</think><answer>joy</answer>"
PARSER_CASES = [
    # (mode, text, guess, think, answer, format_ok)
    ("gta", OK, "joy", "glad words", "joy", True),
    ("gta", "\n <guess> joy </guess>\n<think>\nglad\n</think>\n\n<answer>fear</answer>\n", "joy", "glad", "fear", True),
    ("gta", "\u3000" + OK + "\u3000\t", "joy", "glad words", "joy", True),  # unicode whitespace is whitespace
    ("gta", "<think>glad</think><answer>joy</answer>", None, "glad", "joy", False),  # missing guess
    ("gta", "<guess>joy</guess><think>glad</think><answer>joy", "joy", "glad", None, False),  # truncated
    ("gta", "<guess>joy</guess><think>glad</think>", "joy", "glad", None, False),  # missing answer
    ("gta", OK + "<answer>fear</answer>", "joy", "glad words", None, False),  # repeated answer: ambiguous
    ("gta", "<guess>joy</guess><guess>fear</guess><think>x</think><answer>joy</answer>", None, "x", "joy", False),
    ("gta", "<think>x</think><guess>joy</guess><answer>joy</answer>", "joy", "x", "joy", False),  # wrong order
    ("gta", "<guess>joy</guess><answer>joy</answer><think>x</think>", "joy", "x", "joy", False),  # wrong order
    ("gta", OK + " Hope this helps!", "joy", "glad words", "joy", False),  # text after </answer>
    ("gta", "Sure! " + OK, "joy", "glad words", "joy", False),  # text before <guess>
    ("gta", "<guess>joy</guess> so <think>x</think><answer>joy</answer>", "joy", "x", "joy", False),  # text between
    # nested tags: a part is still read when its own tags are unique, but the format is broken
    ("gta", "<guess>joy</guess><think>maybe <answer>fear</answer></think><answer>joy</answer>",
     "joy", "maybe <answer>fear</answer>", None, False),
    ("gta", "<guess>joy</guess><think><guess>fear</guess></think><answer>joy</answer>", None, "<guess>fear</guess>", "joy", False),
    ("gta", "<guess><think>x</think></guess><answer>joy</answer>", "<think>x</think>", "x", "joy", False),  # nested
    ("gta", "<guess>Joy</guess><think>x</think><answer>JOY</answer>", "Joy", "x", "JOY", False),  # case counts
    ("gta", "<guess>happiness</guess><think>x</think><answer>joy</answer>", "happiness", "x", "joy", False),
    ("gta", "<guess>joy</guess><think></think><answer>joy</answer>", "joy", "", "joy", False),  # empty think
    ("gta", "<guess>joy</guess><think> \n </think><answer>joy</answer>", "joy", "", "joy", False),
    ("gta", "<guess></guess><think></think><answer></answer>", "", "", "", False),  # all tags, no content
    ("gta", "<guess><think><answer>", None, None, None, False),
    ("gta", "</answer>joy<answer>", None, None, None, False),  # close before open
    ("gta", "<Guess>joy</Guess><think>x</think><answer>joy</answer>", None, "x", "joy", False),
    ("gta", "", None, None, None, False),
    ("grpo", "<think>glad words</think> <answer>joy</answer>", None, "glad words", "joy", True),
    ("grpo", OK, None, "glad words", "joy", False),  # a guess block is outside the grpo format
    ("grpo", "<think>x</think><answer>joy</answer></answer>", None, "x", None, False),
    ("sft", "joy", None, None, "joy", True),
    ("sft", " joy\n", None, None, "joy", True),
    ("sft", "Joy", None, None, "Joy", False),
    ("sft", "joy.", None, None, "joy.", False),
    ("sft", "<answer>joy</answer>", None, None, "<answer>joy</answer>", False),
]


@pytest.mark.parametrize("mode, text, guess, think, answer, ok", PARSER_CASES)
def test_parser(mode, text, guess, think, answer, ok):
    assert parse_completion(text, LABELS, mode) == Parsed(guess, think, answer, ok)


def test_parser_unicode_labels():
    labels = ["喜び", "悲しみ"]
    text = "<guess>悲しみ</guess><think>とても😀嬉しい</think><answer>喜び</answer>"
    assert parse_completion(text, labels, "gta") == Parsed("悲しみ", "とても😀嬉しい", "喜び", True)
    assert not parse_completion(text.replace("喜び", "喜"), labels, "gta").format_ok


# ---------------------------------------------------------------- span codes

G, T, A, O = GUESS, THINK, ANSWER, OTHER
# Completions as (text, expected code of its characters) segments, codes written by hand.
SPAN_CASES = {
    "gta": [
        [("<guess>joy</guess>", G), ("<think>", O), ("the writer sounds glad about the news", T), ("</think><answer>", O),
         ("joy", A), ("</answer>", O)],
        [("Sure! ", O), ("<guess> sadness </guess>", G), ("\n<think>", O), ("nothing here is sad, the guess was wrong", T),
         ("</think>\n<answer>", O), ("fear", A), ("</answer>", O), (" Hope this helps.", O)],
        [("<guess>喜び</guess>", G), ("<think>", O), ("とても😀嬉しい", T), ("</think><answer>", O), ("悲しみ", A), ("</answer>", O)],
        [("<guess>joy</guess>", G), ("<think>", O), ("maybe <guess>fear</guess> no", T), ("</think><answer>", O), ("joy", A),
         ("</answer>", O), ("<guess>fear</guess><answer>fear</answer>", O)],  # repeats: only the first of each counts
        [("<think>", O), ("a long pause, then relief", T), ("</think><answer>", O), ("love", A), ("</answer>", O)],  # no guess
        [("<think>", O), ("a", T), ("<guess>joy</guess>", G), ("b", T), ("</think><answer>", O), ("joy", A), ("</answer>", O)],
        [("<guess>joy ", O), ("<think>", O), ("so on and on", T)],  # unclosed guess: no guess block
    ],
    "grpo": [
        [("<think>", O), ("the writer sounds glad about the news", T), ("</think><answer>", O), ("joy", A), ("</answer>", O)],
        [("<guess>joy</guess><think>", O), ("glad", T), ("</think>\n<answer>", O), ("喜び", A), ("</answer>\n", O)],
    ],
    "sft": [[("sadness", A)], [("  ", O), ("very sad", A), ("\n", O)], [("<answer>", A), ("joy", A), ("</answer>", A)]],
}
RANK = {O: 0, T: 1, A: 2, G: 3}


def expected_codes(tok, ids, ranges, char_codes):
    """The slow path: group tokens whose character ranges overlap (a multi-byte character split
    across tokens), give each group the highest-ranked code among its characters."""
    codes, group, end = [], [], -1

    def flush():
        chars = [char_codes[c] for c in range(min(r[0] for r in group), max(r[1] for r in group))]
        codes.extend([max(chars, key=RANK.get, default=O)] * len(group))

    for i, (a, b) in zip(ids, ranges):
        if group and a >= end:
            flush()
            group = []
        group.append((a, b))
        end = max(end, b)
    if group:
        flush()
    return codes


def check_spans(tok, ids, ranges, text, char_codes, mode):
    eos = tok.eos_token_id
    codes = span_codes(tok, ids + [eos], mode)
    assert codes[-1] == OTHER and len(codes) == len(ids) + 1
    assert codes[:-1] == expected_codes(tok, ids, ranges, char_codes)
    if mode != "sft":
        mask = rl_mask(codes, mode)
        assert mask[-1]  # EOS is in the RL loss: ending the turn is the policy's choice
        guess_chars = {c for c, code in enumerate(char_codes) if code == G}
        for (a, b), keep, code in zip(ranges, mask, codes):
            assert keep == (code != GUESS)
            assert not (keep and guess_chars & set(range(a, b))), "an RL token carries guess characters"


def case_text(segments):
    text = "".join(s for s, _ in segments)
    return text, [code for s, code in segments for _ in s]


@pytest.mark.parametrize("name", ["bpe300", "noregex400", "metaspace", "added-think"])
@pytest.mark.parametrize("mode", ["gta", "grpo", "sft"])
def test_span_codes_match_token_offsets(toks, name, mode):
    tok = toks[name]
    for segments in SPAN_CASES[mode]:
        text, char_codes = case_text(segments)
        if name == "metaspace" and text[:1].isspace():
            continue  # "▁▁very" decodes to " very": this tokenizer cannot round-trip leading spaces
        ids, ranges = tok.encode_with_offsets(text)
        assert tok.decode(ids) == text
        check_spans(tok, ids, ranges, text, char_codes, mode)


def test_span_fixtures_split_tags_both_ways(toks):
    """Guard the test above against vacuity: the tokenizers do split tags in the hard ways."""
    text, char_codes = case_text(SPAN_CASES["gta"][0])
    pieces = [t for t in toks["bpe300"].encode("<guess>")]
    assert len(pieces) > 1  # a tag in several tokens
    ids, ranges = toks["noregex400"].encode_with_offsets(text)
    codes = [{char_codes[c] for c in range(a, b)} for a, b in ranges]
    assert any(len(c) > 1 and c != {G} for c in codes)  # tag and content in one token
    assert len(toks["added-think"].encode("<think>")) == 1 < len(toks["bpe300"].encode("<think>"))
    ids, _ = toks["bpe300"].encode_with_offsets("とても😀嬉しい")
    assert len(ids) > len("とても😀嬉しい")  # multi-byte characters split across tokens


@pytest.mark.parametrize("name", ["bpe300", "added-think"])
def test_span_codes_on_non_canonical_tokens(toks, name):
    """A policy may sample any token sequence: encode character by character and check again."""
    tok = toks[name]
    for mode in ("gta", "grpo"):
        for segments in SPAN_CASES[mode]:
            text, char_codes = case_text(segments)
            ids, ranges = [], []
            for c, ch in enumerate(text):
                piece = tok.encode(ch)
                ids += piece
                ranges += [(c, c + 1)] * len(piece)
            check_spans(tok, ids, ranges, text, char_codes, mode)


def test_unclosed_guess_leaves_every_token_to_rl(toks):
    """A guess never closed has no end to mark: no GUESS span, so its think and answer (and the
    guess text itself, the policy's own format error) stay in the RL loss."""
    text = "<guess>joy <think>glad words</think><answer>joy</answer>"
    for tok in toks.values():
        ids = tok.encode(text) + [tok.eos_token_id]
        codes = span_codes(tok, ids, "gta")
        assert GUESS not in codes and all(rl_mask(codes, "gta"))
        assert THINK in codes and ANSWER in codes


def test_guess_tokens_carry_the_guess(toks):
    for tok in toks.values():
        text = "<guess>surprise</guess><think>the box was a shock</think><answer>love</answer>"
        ids = tok.encode(text) + [tok.eos_token_id]
        codes = span_codes(tok, ids, "gta")
        guess = "".join(tok.decode([i]) for i, c in zip(ids, codes) if c == GUESS)
        rl = tok.decode([i for i, keep in zip(ids, rl_mask(codes, "gta")) if keep], skip_special_tokens=True)
        assert "surprise" in guess and "surprise" not in rl and "</guess>" not in rl
        rest = "<think>the box was a shock</think><answer>love</answer>"
        # all of it, except what shares a token with the end of "</guess>" (guess wins that token)
        assert rest.endswith(rl) and "shock</think><answer>love</answer>" in rl
        if tok.encode("</guess><think>") == tok.encode("</guess>") + tok.encode("<think>"):
            assert rl == rest
        assert rl_mask([PROMPT] + codes, "grpo")[1:] == [c != GUESS for c in codes] and not rl_mask([PROMPT], "gta")[0]


class _Capitalizing:
    """Capitalizes the first character of every decode: prefix-stable, but not window-stable."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        s = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return s[:1].upper() + s[1:]


class _Reversing(_Capitalizing):
    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)[::-1]


def test_span_codes_fall_back_to_prefix_decoding(toks):
    tok = toks["bpe300"]
    text, char_codes = case_text(SPAN_CASES["gta"][0])
    ids = tok.encode(text)
    _, ranges = tok.encode_with_offsets(text)
    assert span_codes(_Capitalizing(tok), ids, "gta") == expected_codes(tok, ids, ranges, char_codes)
    with pytest.raises(ValueError, match="not prefix-stable"):
        span_codes(_Reversing(tok), ids, "gta")


# ---------------------------------------------------------------- SFT targets


def _assert_target_text(decoded: str, expected: str) -> None:
    """The SFT ids decode to the target, plus at most the start of `<think>` that BPE merged
    into the closing tag's last token (the target is tokenized with its right context)."""
    assert decoded.startswith(expected) and "<think>".startswith(decoded[len(expected):]), (decoded, expected)


@pytest.mark.parametrize("name", ["bpe300", "noregex400", "metaspace", "added-think"])
def test_sft_target_ids_mask_label_and_closing_tag(toks, name):
    tok = toks[name]
    prompt_text = tok.apply_chat_template(build_messages("I miss home.", LABELS, "gta", [("Best day ever!", "joy")]))
    prompt_ids = tok.encode(prompt_text)
    for label in ("sadness", "surprise", "joy"):
        ids, mask = sft_target_ids(tok, prompt_text, label, "gta")
        _assert_target_text(tok.decode(prompt_ids + ids), prompt_text + f"<guess>{label}</guess>")
        k = mask.index(True)
        assert all(mask[k:]) and not any(mask[:k])  # one contiguous run to the end
        head, tail = tok.decode(ids[:k]), tok.decode(ids[k:])
        # unmasked tokens are tag only; masked ones are the label and closing tag, plus at most
        # the end of "<guess>" when a token merges it with the label's first characters
        assert "<guess>".startswith(head)
        _assert_target_text(head + tail, f"<guess>{label}</guess>")
        assert len(head) == 7 or not tok.decode(ids[k : k + 1]).startswith(label[:1])
        ids_all, mask_all = sft_target_ids(tok, prompt_text, label, "gta", sft_on_open_tag=True)
        assert ids_all == ids and all(mask_all)
        ids_sft, mask_sft = sft_target_ids(tok, prompt_text, label, "sft")
        assert tok.decode(ids_sft) == label and all(mask_sft)
    if name == "bpe300":
        assert tok.decode(ids[:k]) == "<guess>"  # split tags: exactly the opening tag is left out


def test_sft_target_ids_joint_encoding_avoids_prefix_space(toks):
    tok = toks["metaspace"]
    prompt_text = tok.apply_chat_template(build_messages("I miss home.", LABELS, "gta"))
    prompt_ids = tok.encode(prompt_text)
    alone = tok.encode("<guess>joy</guess>")
    assert tok.decode(prompt_ids + alone) != prompt_text + "<guess>joy</guess>"  # "▁<" adds a space
    ids, _ = sft_target_ids(tok, prompt_text, "joy", "gta")
    assert ids != alone
    _assert_target_text(tok.decode(prompt_ids + ids), prompt_text + "<guess>joy</guess>")


def test_sft_target_ids_separate_encoding_when_boundary_merges(tmp_path):
    tok = Tokenizer(write_tokenizer(tmp_path, CORPUS + ["one\n\n"] * 50, 300, template=CHATML_BLANK_LINE))
    prompt_text = tok.apply_chat_template(build_messages("I miss home.", LABELS, "gta"))
    assert prompt_text.endswith("\n\n")
    prompt_ids = tok.encode(prompt_text)
    assert tok.encode(prompt_text + "<guess>joy</guess>")[: len(prompt_ids)] != prompt_ids  # "\n\n" splits as "\n", "\n"
    ids, mask = sft_target_ids(tok, prompt_text, "joy", "gta")
    assert ids == tok.encode("<guess>joy</guess><think>")[: len(ids)]
    _assert_target_text(tok.decode(ids[mask.index(True) :]), "joy</guess>")


def test_sft_target_ids_refuses_a_target_it_cannot_place(tmp_path):
    corpus = ["<|im_start|>assistant\n<guess>joy</guess>", "a\n<guess>joy</guess>"] * 30 + ["Text: hello\nhi"] * 5
    tok = Tokenizer(write_tokenizer(tmp_path, corpus, 200, "metaspace"))
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    with pytest.raises(ValueError, match="cannot tokenize the SFT target"):
        sft_target_ids(tok, prompt_text, "joy", "gta")


@pytest.mark.parametrize("name", ["bpe300", "noregex400", "metaspace", "added-think"])
def test_sft_target_ids_are_the_tokens_of_a_full_completion(toks, name):
    """SFT must teach the very tokens a well-formed completion is made of, including a token
    that merges `</guess>` with the start of `<think>`; a lone `>` would teach the model to stop."""
    tok = toks[name]
    prompt_text = tok.apply_chat_template(build_messages("I miss home.", LABELS, "gta", [("Best day ever!", "joy")]))
    n = len(tok.encode(prompt_text))
    for label in LABELS:
        ids, _ = sft_target_ids(tok, prompt_text, label, "gta")
        full = tok.encode(prompt_text + format_target(label, "gta"))[n:]
        assert ids == full[: len(ids)]
