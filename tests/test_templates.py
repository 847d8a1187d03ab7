"""The paper's three model families through their real chat templates (tests/data/chat_templates/):
worked examples reach the model whole, Qwen3's thinking switch, the template's own system prompt,
completions a model would sample after such a prompt, and tokenizer/model fit."""

import json

import pytest

from gtacore.data import Example
from gtacore.completions import ANSWER, GUESS, format_target, parse_completion, rl_mask, span_codes
from gtacore.prompts import build_messages, choose_layout, render_chat, sft_target_ids
from gtacore.prompts import make_prompts
from gtacore.models.tokenizer import Tokenizer, TokenizerError
from tiny_models import BASE
from tokenizer_fixtures import family_template, write_tokenizer

FAMILIES = ["qwen2.5", "qwen3", "llama3.2"]
MODES = ["gta", "grpo", "sft"]
LABELS = ["joy", "sadness", "anger", "fear"]
SHOTS = [Example("Best day ever!", "joy", "train.jsonl:3"),
         Example("Who took my parking spot again?", "anger", "train.jsonl:8")]
QUESTION = Example("The rain never ends and I miss home.", "sadness", "test.jsonl:1")
CORPUS = ([format_target(y, m) for y in LABELS for m in MODES] * 3 + [e.text for e in SHOTS + [QUESTION]]
          + [m["content"] for m in build_messages("x", LABELS, "gta")])
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3_EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: Tokenizer(write_tokenizer(root / f, CORPUS, 400, family=f)) for f in FAMILIES}


def test_fixture_templates_are_the_real_ones():
    """Guard the fixtures: each file is its family's template, not a hand-written stand-in."""
    assert "enable_thinking is defined and enable_thinking is false" in family_template("qwen3")
    assert "content.split('</think>')[-1]" in family_template("qwen3")
    assert QWEN_SYSTEM in family_template("qwen2.5")
    assert "Cutting Knowledge Date: December 2023" in family_template("llama3.2")


@pytest.mark.parametrize("family", FAMILIES)
def test_rendering_matches_transformers(toks, family):
    """Our sandboxed renderer gives Hugging Face's text for the real templates, enable_thinking included."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(toks[family].path)
    shots = [(e.text, e.label) for e in SHOTS]
    for messages in (build_messages(QUESTION.text, LABELS, "gta", shots),
                     build_messages(QUESTION.text, LABELS, "sft", shots, template_system=True)):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
        assert render_chat(toks[family], messages) == expected


@pytest.mark.parametrize("shots", [1, 2])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_holds_every_worked_example_whole(toks, family, mode, shots):
    tok = toks[family]
    (prompt,) = make_prompts(tok, [QUESTION], LABELS, mode, SHOTS[:shots], 10_000)
    for shot in SHOTS[:shots]:
        assert shot.text in prompt.text and format_target(shot.label, mode) in prompt.text
    assert prompt.ids == tok.encode(prompt.text)
    # Qwen3 drops the think (and guess) of earlier assistant turns, so the examples move into the
    # user turn there, and only there: a bare sft label survives as an assistant turn.
    in_user = choose_layout(tok, LABELS, mode, [(s.text, s.label) for s in SHOTS[:shots]])
    assert in_user == (family == "qwen3" and mode != "sft")
    assert prompt.text.endswith(QWEN3_EMPTY_THINK) == (family == "qwen3")


@pytest.mark.parametrize("family", FAMILIES)
def test_template_system_prompt(toks, family):
    tok = toks[family]
    instruction = build_messages("x", LABELS, "gta")[0]["content"]
    ours = make_prompts(tok, [QUESTION], LABELS, "gta", SHOTS[:1], 10_000)[0].text
    theirs = make_prompts(tok, [QUESTION], LABELS, "gta", SHOTS[:1], 10_000, template_system_prompt=True)[0].text
    user_start = {"qwen2.5": "<|im_start|>user\n", "qwen3": "<|im_start|>user\n",
                  "llama3.2": "<|start_header_id|>user<|end_header_id|>\n\n"}[family]
    assert instruction in ours and user_start + instruction not in ours  # ours: the system message
    assert user_start + instruction + "\n\n" in theirs  # template_system_prompt: it opens the first user turn
    assert (QWEN_SYSTEM in theirs) == (family == "qwen2.5") and QWEN_SYSTEM not in ours
    custom = make_prompts(tok, [QUESTION], LABELS, "gta", SHOTS[:1], 10_000, system_prompt="Pick one of {labels}.",
                          template_system_prompt=True)[0].text
    assert user_start + "Pick one of joy, sadness, anger, fear.\n\n" in custom and instruction not in custom


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sampled_completion_parses_and_spans(toks, family, mode):
    """What a model would generate after the prompt (the target, then the family's EOS) parses,
    and its guess block, and nothing else, is kept out of the RL loss."""
    tok = toks[family]
    (prompt,) = make_prompts(tok, [QUESTION], LABELS, mode, SHOTS, 10_000)
    target = format_target("fear", mode)
    ids = tok.encode(target) + [tok.eos_token_id]
    parsed = parse_completion(tok.decode(ids, skip_special_tokens=True), LABELS, mode)
    assert parsed.format_ok and parsed.answer == "fear"
    codes = span_codes(tok, ids, mode)
    assert len(codes) == len(ids)
    if mode == "sft":
        assert tok.decode([i for i, c in zip(ids, codes) if c == ANSWER], skip_special_tokens=True) == "fear"
        return
    n_guess = codes.count(GUESS)
    assert codes[:n_guess] == [GUESS] * n_guess  # one run at the start
    guess = tok.decode(ids[:n_guess])
    if mode == "gta":  # the whole block, plus at most the start of "<think>" when BPE merges across
        assert guess.startswith("<guess>fear</guess>") and "<think>".startswith(guess[len("<guess>fear</guess>"):])
        if family == "qwen3":  # <think> is an added token: nothing merges into it
            assert guess == "<guess>fear</guess>"
        ids_sft, mask = sft_target_ids(tok, prompt.text, "fear", mode)
        assert tok.decode(ids_sft).startswith("<guess>fear</guess>") and any(mask)
    else:
        assert n_guess == 0
    assert rl_mask(codes, mode) == [c != GUESS for c in codes]


# Templates that lose worked examples wherever they are: one keeps only the text after `</think>`
# of every message (Qwen3 does it to earlier assistant turns only), one keeps only the last line of
# each user turn and no assistant turn.
_TURN = "{{ '<|im_start|>' + m['role'] + '\\n' + %s + '<|im_end|>\\n' }}"
_END = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
AFTER_THINK = "{% for m in messages %}" + _TURN % "m['content'].split('</think>')[-1]" + "{% endfor %}" + _END
LAST_LINE = ("{% for m in messages %}{% if m['role'] != 'assistant' %}" + _TURN % "m['content'].split('\\n')[-1]"
             + "{% endif %}{% endfor %}" + _END)


@pytest.mark.parametrize("mode, template, lost", [
    ("gta", AFTER_THINK, "(missing '<guess>joy</guess>', '<think>The wording"),
    ("grpo", AFTER_THINK, "(missing '<think>The wording"),
    ("sft", LAST_LINE, "'joy' (all of it)"),
])
def test_a_template_that_drops_the_examples_is_refused(tmp_path, mode, template, lost):
    tok = Tokenizer(write_tokenizer(tmp_path / "dropping", CORPUS, 300, template=template))
    with pytest.raises(TokenizerError, match="drops part of the worked examples") as err:
        make_prompts(tok, [QUESTION], LABELS, mode, SHOTS[:1], 10_000)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "dropping"))
    assert message.count(lost) == 2  # as earlier turns, and inside the user turn
    assert make_prompts(tok, [QUESTION], LABELS, mode, [], 10_000)  # without worked examples it is usable


def test_tokenizer_must_fit_the_model(tmp_path):
    """A tokenizer with more ids than a tiny model's embedding rows is refused, naming both sizes."""
    rows = BASE["vocab_size"]
    path = write_tokenizer(tmp_path / "tok", CORPUS, rows + 40, family="qwen3")
    tok = Tokenizer(path)
    assert tok.vocab_size > rows
    with pytest.raises(TokenizerError, match=rf"needs {tok.vocab_size} embedding rows, but the model has {rows}") as err:
        tok.check_fits(rows, tmp_path / "model")
    assert str(tmp_path / "model") in str(err.value) and str(path) in str(err.value)
    tok.check_fits(tok.vocab_size)
    tok.check_fits(tok.vocab_size + 128)  # a padded embedding table is fine
    # a stop id from generation_config.json that the vocabulary lacks
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, tok.vocab_size + 5]}))
    with pytest.raises(TokenizerError, match="stop token"):
        Tokenizer(path).check_fits(tok.vocab_size)
