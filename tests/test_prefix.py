"""Shared-prefix forward/backward equals running every full sequence (the obviously right path)."""

import dataclasses

import pytest
import torch

from gtacore import models
from gtacore.config import LossArgs
from gtacore.losses import Branch, branch_loss, forward_backward, head_weight, logprobs, loss_row_hidden
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from tiny_models import write_hf_checkpoint

G = 3


@pytest.fixture(scope="module", params=["llama3-untied", "qwen3-tied"])
def model(request, tmp_path_factory):
    m = models.load_pretrained(write_hf_checkpoint(request.param, tmp_path_factory.mktemp("m") / "c"))
    return m.train()


def _data(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(n) for n in (7, 12, 4)]
    rollouts = [rand(n) for n in (5, 1, 9, 3, 6, 2, 8, 4, 7)]  # G = 3 per prompt, different lengths
    rl_masks = [[bool(x) for x in torch.rand(len(c), generator=g) > 0.3] for c in rollouts]
    rl_masks = [[True] + m[1:] for m in rl_masks]  # the first token (predicted by the prompt) is a loss row
    sft = [rand(n) for n in (3, 2, 4)]
    sft_masks = [[False] + [True] * (len(s) - 1) for s in sft]
    advantages = torch.randn(len(rollouts), generator=g).tolist()
    return prompts, rollouts, rl_masks, sft, sft_masks, advantages


def pack(prompts_per_seq, conts, masks, kind, adv=None):
    """The plain layout: sequence s is prompts_per_seq[s] + conts[s]."""
    return pack_rows(prompts_per_seq, range(len(conts)), conts, masks, kind, adv, "cpu")


def branch(rows, old, ref, normalizer, temperature, args):
    """A Branch with the loss settings the old API derived per branch: no KL term without ref."""
    settings = args.settings(temperature, normalizer)
    if ref is None:
        settings = dataclasses.replace(settings, beta=0.0)
    return Branch(rows, settings, old, ref)


def _plain_grads(model, params, batch, old, ref, args, T, norm):
    out = branch_loss(loss_row_hidden(model, batch), head_weight(model), branch(batch, old, ref, norm, T, args))
    out.loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads, out


@pytest.mark.parametrize("mode", ["gta", "grpo", "sft"])
def test_logprobs_and_gradients_equal_the_plain_path(model, mode):
    torch.manual_seed(0)
    params = list(model.parameters())
    prompts, rollouts, rl_masks, sft, sft_masks, adv = _data(model.config.vocab_size)
    args = LossArgs(mode=mode, beta=0.1 if mode != "sft" else 0.0, agg="seq_mean" if mode == "grpo" else "token_mean")
    T, norm = 0.7, None
    parent = [r // G for r in range(len(rollouts))]
    pp = pack_prompts(prompts, "cpu")
    plain, prefix = [], []
    if mode != "sft":
        rl_plain = pack([prompts[b] for b in parent], rollouts, rl_masks, RL_ROW, adv)
        rl_branch = pack_rows(pp, parent, rollouts, rl_masks, RL_ROW, adv, "cpu")
        lp_plain = logprobs(model, rl_plain, T)
        lp_prefix = logprobs(model, rl_branch, T)
        assert (lp_plain - lp_prefix).abs().max() <= 1e-5
        old = lp_plain + 0.05 * torch.randn_like(lp_plain)  # mu > 1: ratios away from 1, some clipped
        ref = lp_plain + 0.1 * torch.randn_like(lp_plain)
        plain.append((rl_plain, old, ref))
        prefix.append((rl_branch, old, ref, norm, T))
    if mode != "grpo":
        sft_parent = list(range(len(prompts)))
        plain.insert(0, (pack(prompts, sft, sft_masks, SFT_ROW), None, None))
        prefix.insert(0, (pack_rows(pp, sft_parent, sft, sft_masks, SFT_ROW, None, "cpu"), None, None, norm, T))
    results = forward_backward(model, params, [branch(*b, args) for b in prefix])
    for (batch, old, ref), result in zip(plain, results):
        grads, out = result.grads, result.loss
        expected, ref_out = _plain_grads(model, params, batch, old, ref, args, T, norm)
        assert torch.allclose(out.sft_loss, ref_out.sft_loss, atol=1e-6) and torch.allclose(out.rl_loss, ref_out.rl_loss, atol=1e-6)
        for p_name, a, b in zip([n for n, _ in model.named_parameters()], grads, expected):
            assert (a - b).abs().max() <= 1e-5, p_name
        assert any(g.abs().max() > 0 for g in grads)


def test_siblings_do_not_see_each_other(model):
    """Changing one rollout must leave its siblings' log-probs unchanged."""
    prompts, rollouts, rl_masks, *_ = _data(model.config.vocab_size, seed=1)
    parent = [r // G for r in range(len(rollouts))]
    pp = pack_prompts(prompts, "cpu")
    a = logprobs(model, pack_rows(pp, parent, rollouts, rl_masks, RL_ROW, None, "cpu"), 1.0)
    changed = [list(c) for c in rollouts]
    changed[1] = [5]  # sibling of rollouts 0 and 2 (same length, different token)
    b_branch = pack_rows(pp, parent, changed, rl_masks, RL_ROW, None, "cpu")
    b = logprobs(model, b_branch, 1.0)
    seq = b_branch.seq_ids
    assert torch.equal(a[seq != 1], b[seq != 1])


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    """Recomputing each block in the backward (both backward paths, with the prompt pass's
    retained graph run twice) changes no gradient and no parameter name."""
    from gtacore.parallel import checkpoint_blocks

    path = write_hf_checkpoint("qwen3-tied", tmp_path / "c")
    plain_model, ckpt_model = (models.load_pretrained(path).train() for _ in range(2))
    checkpoint_blocks(ckpt_model)
    assert list(plain_model.state_dict()) == list(ckpt_model.state_dict())

    def saved_bytes(m):  # what autograd keeps from a forward
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            m(torch.randint(0, m.config.vocab_size, (1, 64)), return_hidden=True)
        return sum(kept)

    assert saved_bytes(ckpt_model) < saved_bytes(plain_model) / 3  # the blocks really are recomputed
    prompts, rollouts, rl_masks, sft, sft_masks, adv = _data(plain_model.config.vocab_size)
    parent = [i // G for i in range(len(rollouts))]
    pp = pack_prompts(prompts, "cpu")
    args = LossArgs()
    prefix = [(pack_rows(pp, list(range(len(prompts))), sft, sft_masks, SFT_ROW, None, "cpu"), None, None, None, 1.0),
              (pack_rows(pp, parent, rollouts, rl_masks, RL_ROW, adv, "cpu"), None, None, 40.0, 1.0)]
    full = [(pack([prompts[b] for b in parent], rollouts, rl_masks, RL_ROW, adv), None, None, 40.0, 1.0)]
    for run in (lambda m: forward_backward(m, list(m.parameters()), [branch(*b, args) for b in prefix]),
                lambda m: forward_backward(m, list(m.parameters()), [branch(*b, args) for b in full])):
        for want, got in zip(run(plain_model), run(ckpt_model)):
            for a, b in zip(want.grads, got.grads):
                assert torch.equal(a, b)
