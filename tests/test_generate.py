"""KV-cache generation against full forwards, which are obviously right."""

import pytest
import torch

from gtacore import models
from gtacore.models.decoder import KVCache
from gtacore.models.generate import SamplingParams, decode_one_token, generate, left_pad, prefill, sample_tokens
from tiny_models import write_hf_checkpoint

EOS = 2


@pytest.fixture(scope="module", params=["llama3-untied", "qwen2-tied", "qwen3-tied"])
def model(request, tmp_path_factory):
    path = write_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    return models.load_pretrained(path)


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_cache_decode_equals_repeated_full_forward(model):
    prompts = _prompts(model.config.vocab_size, [5, 12, 1, 8])
    out = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=0), stop_token_ids=[EOS], pad_id=0)
    for b, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(16):
            with torch.no_grad():
                nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == EOS:
                break
        assert out.tokens[b][out.mask[b]].tolist() == seq[len(prompt):]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_forward(model, temperature):
    prompts = _prompts(model.config.vocab_size, [6, 3, 10], seed=1)
    G = 3
    g = torch.Generator().manual_seed(5)
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=temperature, num_samples=G), [EOS], 0, generator=g)
    assert out.tokens.shape[0] == len(prompts) * G
    assert out.prompt_index.tolist() == [b for b in range(len(prompts)) for _ in range(G)]
    for r in range(out.tokens.shape[0]):
        prompt = prompts[r // G]
        gen = out.tokens[r][out.mask[r]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen.tolist()]))[0, len(prompt) - 1 : -1] / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, gen[:, None])[:, 0]
        assert (out.logprobs[r][out.mask[r]] - expected).abs().max().item() <= 1e-4
        assert (out.logprobs[r][~out.mask[r]] == 0).all()


def test_prefill_then_decode_one_token_equals_full_forward(model):
    # Drive the two phases by hand with teacher-forced tokens, as generate's loop does.
    V, steps = model.config.vocab_size, 5
    prompts = _prompts(V, [7, 2, 11], seed=3)
    new = torch.randint(3, V, (len(prompts), steps), generator=torch.Generator().manual_seed(4))  # [B, steps]
    ids, valid = left_pad(prompts, 0, "cpu")  # [B, P]
    B, P = ids.shape
    cache = KVCache(model.config, B, P + steps, model.lm_head.weight.dtype, "cpu")
    cache.k.normal_()  # poison: a slot read before it is written fails
    cache.v.normal_()
    key_valid = torch.cat([valid, torch.ones(B, steps, dtype=torch.bool)], dim=1)  # [B, P + steps]
    positions = valid.sum(-1, keepdim=True)  # [B, 1]
    with torch.no_grad():
        logits = [prefill(model, ids, valid, cache)]
        cache.slots = torch.zeros(1, dtype=torch.long)
        for s in range(steps):
            cache.slots.fill_(P + s)
            cache.kv_len = P + s + 1
            logits.append(decode_one_token(model, new[:, s : s + 1], positions + s, key_valid, cache))
        for b, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt + new[b].tolist()]))[0, len(prompt) - 1 :].float()  # [steps + 1, V]
            assert (torch.stack([step[b] for step in logits]) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_without_logprobs_same_tokens_and_no_logprobs(model, temperature):
    prompts = _prompts(model.config.vocab_size, [6, 3, 10], seed=1)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, num_samples=3, top_p=0.9)
    runs = [generate(model, prompts, params, [EOS], 0, generator=torch.Generator().manual_seed(5), with_logprobs=w)
            for w in (True, False)]
    assert runs[0].logprobs is not None and runs[1].logprobs is None
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)
    assert torch.equal(runs[0].finished, runs[1].finished)


def test_rows_stop_at_a_stop_token_and_are_padded_after(model):
    prompts = _prompts(model.config.vocab_size, [4, 9], seed=2)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    free = generate(model, prompts, params, stop_token_ids=[], pad_id=0)
    stop = int(free.tokens[0, 3])  # row 0 must now stop after its 4th token
    out = generate(model, prompts, params, stop_token_ids=[stop], pad_id=0)
    first = free.tokens[0].tolist().index(stop)
    assert out.mask[0].tolist() == [True] * (first + 1) + [False] * (out.mask.shape[1] - first - 1)
    assert out.finished[0] and (out.tokens[0, first + 1 :] == 0).all()
    for r in range(out.tokens.shape[0]):
        m = out.mask[r].tolist()
        n = sum(m)
        assert m == [True] * n + [False] * (len(m) - n), "mask must be a prefix"
        assert out.tokens[r, :n].tolist() == free.tokens[r, :n].tolist()
        assert out.finished[r] == (stop in out.tokens[r, :n].tolist())


def test_stop_strings_cut_the_completion():
    vocab = [str(i) for i in range(50)]
    decode = lambda ids: " ".join(vocab[i] for i in ids)  # noqa: E731
    # Stop strings are checked on the text: the cut keeps the token that completes it.
    from gtacore.models.generate import _apply_stop_strings

    tokens = torch.tensor([[5, 7, 9, 11], [1, 2, 3, 4], [7, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    logprobs = torch.randn(3, 4).masked_fill(~mask, 0.0)
    finished = torch.tensor([False, False, True])
    _apply_stop_strings(tokens, mask, logprobs, finished, 4, ("7 9",), decode, pad_id=0)
    assert tokens[0].tolist() == [5, 7, 9, 0] and mask[0].tolist() == [True, True, True, False]
    assert finished.tolist() == [True, False, True]
    assert mask[1].all() and tokens[1].tolist() == [1, 2, 3, 4]


def test_sampler_frequencies_follow_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_tokens(logits, 1.0, generator=g), minlength=5).float() / 20000
    assert (counts - logits[0].softmax(-1)).abs().max() < 0.015
    top2 = torch.bincount(sample_tokens(logits, 1.0, top_k=2, generator=g), minlength=5).float() / 20000
    assert top2[2:].sum() == 0 and (top2[:2] - logits[0, :2].softmax(-1)).abs().max() < 0.015
    # top_p=0.8: cumulative mass of ranks above {0: 0, 1: .63, 2: .86}: keeps tokens 0 and 1 only.
    topp = torch.bincount(sample_tokens(logits, 1.0, top_p=0.8, generator=g), minlength=5).float() / 20000
    assert topp[2:].sum() == 0 and topp[1] > 0.2
    assert (sample_tokens(logits[:3], 0.0) == 0).all()


def _dynamic_generate(model, prompts, params, generator):
    """The decode loop as it was before the static step: each step attends to the slots written
    so far (kv_len grows), the cache sliced to them. Sampling draws in the same order."""
    ids, valid = left_pad(prompts, 0, "cpu")
    (B, P), G, Tn = ids.shape, params.num_samples, params.max_new_tokens
    cache = KVCache(model.config, B, P + Tn, model.lm_head.weight.dtype, "cpu")
    with torch.no_grad():
        logits = prefill(model, ids, valid, cache).repeat_interleave(G, dim=0)
        cache = cache.repeat_rows(G)
        key_valid = torch.cat([valid.repeat_interleave(G, dim=0), torch.ones(B * G, Tn, dtype=torch.bool)], dim=1)
        positions = valid.sum(-1).repeat_interleave(G)[:, None]
        cache.slots = torch.zeros(1, dtype=torch.long)
        tokens, logprobs = [], []
        for s in range(Tn):
            tok = sample_tokens(logits, params.temperature, params.top_p, params.top_k, generator)
            tokens.append(tok)
            logprobs.append(torch.log_softmax(logits / params.temperature, -1).gather(-1, tok[:, None])[:, 0])
            if s == Tn - 1:
                break
            cache.slots.fill_(P + s)
            cache.kv_len = P + s + 1
            logits = decode_one_token(model, tok[:, None], positions, key_valid, cache)
            positions = positions + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


@pytest.mark.parametrize("cuda_graph", [False, True])  # on CPU the flag falls back to the eager step
def test_static_decode_equals_the_dynamic_decode(model, cuda_graph):
    prompts = _prompts(model.config.vocab_size, [6, 3, 10], seed=7)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=3, cuda_graph=cuda_graph)
    out = generate(model, prompts, params, [], 0, generator=torch.Generator().manual_seed(3))
    tokens, logprobs = _dynamic_generate(model, prompts, params, torch.Generator().manual_seed(3))
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.logprobs, logprobs, atol=1e-5, rtol=0)
