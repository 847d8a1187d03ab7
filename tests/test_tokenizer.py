"""Our tokenizer wrapper and chat-template rendering against transformers."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers

from gtacore.models.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: header tokens, a date line from strftime_now, and raise_exception.
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('first turn must not be the assistant') }}{% endif %}"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if loop.first %}{{ 'Date: ' + strftime_now('%Y') + '\n' }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXT = ["The movie was not bad at all, honestly.", "I can't say I loved it: 3/10.", "Guess, think, answer!"] * 20


def _write_tokenizer(path, template, eos="<|im_end|>", bos=None, as_jinja_file=False):
    tok = HFTokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos, "pad_token": None}
    if as_jinja_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(eos), tok.token_to_id("<|endoftext|>")]}))
    return path


MESSAGES = [
    [{"role": "user", "content": "Classify: the food was great but the service was slow."}],
    [{"role": "system", "content": "Labels: positive, negative."}, {"role": "user", "content": "  Not bad!  "},
     {"role": "assistant", "content": "<guess>positive</guess>"}, {"role": "user", "content": "Terrible."}],
]


@pytest.mark.parametrize("template, eos, bos", [(CHATML, "<|im_end|>", None), (LLAMA3, "<|eot_id|>", "<|begin_of_text|>")])
@pytest.mark.parametrize("as_jinja_file", [False, True])
def test_chat_template_matches_transformers(tmp_path, template, eos, bos, as_jinja_file):
    path = _write_tokenizer(tmp_path, template, eos, bos, as_jinja_file)
    ours = Tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    for messages in MESSAGES:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode("I can't say 3/10.")) == "I can't say 3/10."


def test_special_tokens_and_stop_ids(tmp_path):
    ours = Tokenizer(_write_tokenizer(tmp_path, CHATML))
    im_end = ours.encode("<|im_end|>")
    assert len(im_end) == 1 and ours.eos_token_id == im_end[0]
    assert ours.pad_token_id == ours.eos_token_id  # no pad token: fall back to EOS
    assert set(ours.stop_token_ids) == {ours.eos_token_id, ours.encode("<|endoftext|>")[0]}


def test_template_errors_are_clear(tmp_path):
    ours = Tokenizer(_write_tokenizer(tmp_path, LLAMA3, "<|eot_id|>", "<|begin_of_text|>"))
    with pytest.raises(TokenizerError, match="first turn must not be the assistant"):
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_sandbox_blocks_python_internals(tmp_path):
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    ours = Tokenizer(_write_tokenizer(tmp_path, evil))
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        ours.apply_chat_template(MESSAGES[0])


def test_missing_template_eos_and_files(tmp_path):
    path = _write_tokenizer(tmp_path / "a", CHATML)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": None}))
    with pytest.raises(TokenizerError, match="has no chat_template"):
        Tokenizer(path).apply_chat_template(MESSAGES[0])
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": None}))
    with pytest.raises(TokenizerError, match="no eos_token"):
        Tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        Tokenizer(path)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path / "empty")
