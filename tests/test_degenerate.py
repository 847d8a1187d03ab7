"""Degenerate rollout groups, end to end through the real functions on a tiny random model.

Each case runs parse -> reward -> advantage -> span codes -> RL mask -> pack -> loss ->
backward (`losses.forward_backward` on both layouts: the plain one, every sequence in full, and
the shared-prefix one) and checks that nothing is NaN and that the RL gradient is exactly
zero whenever the batch carries no signal. The unit-level verdicts live elsewhere and are
not repeated: the parser on an empty think and on all-tag completions (rows of
`test_prompts.PARSER_CASES`), `group_advantages` on G = 1 and on equal groups
(`test_rewards.test_group_advantages_degenerate_groups`).
"""

import dataclasses
import importlib
import os

import pytest
import torch
from train_fixtures import LABELS, write_tiny_checkpoint

from gtacore import models
from gtacore.config import LossArgs
from gtacore.losses import Branch, forward_backward, logprobs
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.projection import apply_gradient_constraint
from gtacore.completions import parse_completion, rl_mask, span_codes
from gtacore.rewards import batch_rewards, group_advantages, reward
from gtacore.prompts import build_messages, render_prompt
from gtacore.models.tokenizer import Tokenizer

os.environ.setdefault("GTACORE_POISON_OUTPUTS", "1")  # an output a kernel forgets to write is NaN
fused_linear_module = importlib.import_module("gtacore.kernels.fused_linear")
GOOD = "<guess>joy</guess><think>the text says glad</think><answer>joy</answer>"
WRONG = "<guess>joy</guess><think>the text says glad</think><answer>fear</answer>"
PATHS = ("plain", "prefix")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
    model, tok = models.load_pretrained(path).train(), Tokenizer(path)
    prompts = [render_prompt(tok, build_messages(f"I feel {w} about item {i}.", LABELS, "gta"))
               for i, w in enumerate(("glad", "mad", "scared"))]
    return model, tok, prompts


def rollout(tok, texts, golds, group_size, eos=True, scale_std=True, w_format=1.0):
    """What gtacore.rollout.rollout computes from decoded texts: (ids, rewards, advantages, rl masks)."""
    ids = [tok.encode(t) + ([tok.eos_token_id] if eos else []) for t in texts]
    rewards, _ = batch_rewards(texts, golds, LABELS, "gta", w_format=w_format)
    advantages = group_advantages(rewards, group_size, scale_std=scale_std)
    masks = [rl_mask(span_codes(tok, c, "gta"), "gta") for c in ids]
    return ids, rewards, advantages, masks


def branch(rows, ref, normalizer, temperature, args):
    """A Branch with the loss settings the old API derived per branch: no KL term without ref."""
    settings = args.settings(temperature, normalizer)
    if ref is None:
        settings = dataclasses.replace(settings, beta=0.0)
    return Branch(rows, settings, None, ref)


def rl_backward(setup, path, ids, masks, advantages, group_size, args=None, ref=False):
    """The RL branch of a training step: (gradients, FusedGTALoss) from `path`."""
    model, _, prompts = setup
    args = args or LossArgs(mode="gta", beta=0.0)
    params = list(model.parameters())
    parent = [r // group_size for r in range(len(ids))]
    adv = advantages.tolist()
    if path == "plain":
        rows = pack_rows([prompts[b] for b in parent], range(len(ids)), ids, masks, RL_ROW, adv, "cpu")
    else:
        pp = pack_prompts(prompts[: parent[-1] + 1], "cpu")
        rows = pack_rows(pp, parent, ids, masks, RL_ROW, adv, "cpu")
    ref_lp = logprobs(model, rows, 1.0) if ref else None
    [result] = forward_backward(model, params, [branch(rows, ref_lp, 1000.0, 1.0, args)])
    return result.grads, result.loss


def all_zero(grads):
    return all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def all_finite(grads):
    return all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("path", PATHS)
def test_group_of_one_has_zero_advantages_and_zero_rl_gradient(setup, path):
    _, tok, _ = setup
    texts = [GOOD, WRONG, "<guess>joy</guess><think></think><answer>joy</answer>"]
    ids, rewards, advantages, masks = rollout(tok, texts, ["joy"] * 3, group_size=1)
    assert rewards.tolist() == [2.0, 1.0, 1.0]  # the rewards differ; only G = 1 zeroes the advantages
    assert torch.equal(advantages, torch.zeros(3))
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=1)
    assert out.loss.item() == 0.0 and out.rl_loss.item() == 0.0
    assert all_zero(grads)
    # The same rollouts as one group of three carry signal: the harness does see gradients.
    ids, _, advantages, masks = rollout(tok, texts, ["joy"] * 3, group_size=3)
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=3)
    assert torch.isfinite(out.loss) and all_finite(grads) and not all_zero(grads)


@pytest.mark.parametrize("path", PATHS)
def test_equal_rewards_in_every_group_give_zero_rl_gradient(setup, path):
    _, tok, _ = setup
    short = "<guess>joy</guess><think>glad</think><answer>{}</answer>"
    texts = [short.format("joy")] * 6 + [short.format("fear")] * 6  # B = 2 groups of G = 6
    # Rewards 1.3 and 0.3: six of them do not average back exactly in float32, so r - mean(r)
    # is round-off, not 0; it must not reach the loss as a (std-amplified) advantage.
    ids, rewards, advantages, masks = rollout(tok, texts, ["joy"] * 12, 6, w_format=0.3)
    assert rewards.tolist() == pytest.approx([1.3] * 6 + [0.3] * 6) and len(set(rewards.tolist())) == 2
    assert (rewards[:6] - rewards[:6].mean()).abs().max() > 0
    assert torch.equal(advantages, torch.zeros(12))
    assert torch.equal(rollout(tok, texts, ["joy"] * 12, 6, scale_std=False, w_format=0.3)[2], torch.zeros(12))
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=6)
    assert out.loss.item() == 0.0 and all_zero(grads)


@pytest.mark.parametrize("path", PATHS)
def test_no_completion_emits_eos(setup, path):
    """Every completion hit max_new_tokens: the parser rejects the format, the mask stays defined."""
    _, tok, _ = setup
    texts = ["<guess>joy</guess><think>bla bla", GOOD + " and then", "<guess>joy", "<guess>joy</guess><think>x</think><answer>jo"]
    ids, rewards, advantages, masks = rollout(tok, texts, ["joy"] * 4, group_size=4, eos=False)
    assert not any(parse_completion(t, LABELS, "gta").format_ok for t in texts)
    assert rewards.tolist() == [0.0, 1.0, 0.0, 0.0]  # the closed, correct answer still scores w_acc
    assert all(tok.eos_token_id not in c and len(m) == len(c) for c, m in zip(ids, masks))
    # The RL loss sees exactly the text after the guess block (all of it when the guess never closed).
    kept = [tok.decode([i for i, keep in zip(c, m) if keep]) for c, m in zip(ids, masks)]
    assert kept == ["<think>bla bla", GOOD.removeprefix("<guess>joy</guess>") + " and then", "<guess>joy",
                    "<think>x</think><answer>jo"]
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=4)
    assert torch.isfinite(out.loss) and all_finite(grads) and not all_zero(grads)


def test_empty_think_gets_no_format_reward(setup):
    # Parsed(..., format_ok=False) for this text is a row of test_prompts.PARSER_CASES.
    text = "<guess>joy</guess><think></think><answer>joy</answer>"
    parsed = parse_completion(text, LABELS, "gta")
    assert reward(parsed, "joy", w_format=1.0, w_acc=0.0) == 0.0  # the format term alone
    assert reward(parsed, "joy", w_format=0.5, w_acc=1.0) == 1.0  # the answer still counts
    rewards, _ = batch_rewards([text, GOOD], ["joy", "joy"], LABELS, "gta", w_format=0.5, w_acc=1.0)
    assert rewards.tolist() == [1.0, 1.5]


@pytest.mark.parametrize("path", PATHS)
def test_all_tag_completions(setup, path):
    _, tok, _ = setup
    texts = ["<guess></guess><think></think><answer></answer>", "<guess><think><answer>", GOOD]
    ids, rewards, advantages, masks = rollout(tok, texts, ["joy"] * 3, group_size=3)
    assert [parse_completion(t, LABELS, "gta").format_ok for t in texts] == [False, False, True]
    assert rewards.tolist() == [0.0, 0.0, 2.0]
    # An unclosed <guess> marks no guess block: every token, the EOS too, is in the RL loss.
    assert all(masks[1])
    assert tok.decode([i for i, keep in zip(ids[0], masks[0]) if keep], skip_special_tokens=True) == \
        "<think></think><answer></answer>"
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=3)
    assert torch.isfinite(out.loss) and all_finite(grads) and not all_zero(grads)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("path", PATHS)
def test_batch_with_no_rl_tokens(setup, path, agg, kernel, monkeypatch):
    """Every completion lies inside its guess block: the RL loss has no rows at all."""
    if kernel == "reference":
        monkeypatch.setattr(fused_linear_module, "triton_runs_on", lambda tensor: False)
    _, tok, _ = setup
    texts = ["<guess>joy</guess>", "<guess>anger</guess>", "<guess>fear</guess>"]
    ids = [tok.encode(t) for t in texts]  # truncated: no EOS, which would be an RL token
    masks = [rl_mask(span_codes(tok, c, "gta"), "gta") for c in ids]
    assert not any(any(m) for m in masks)
    advantages = torch.tensor([1.0, -2.0, 0.5])  # nonzero: only the empty mask keeps the loss at 0
    args = LossArgs(mode="gta", agg=agg, beta=0.04)
    grads, out = rl_backward(setup, path, ids, masks, advantages, group_size=3, args=args, ref=True)
    assert out.loss.item() == 0.0 and out.rl_loss.item() == 0.0 and out.sft_loss.item() == 0.0
    assert all(s.numel() == 0 for s in out.stats.values())
    assert all_zero(grads)


def test_no_rl_tokens_beside_sft_rows(setup):
    """gta mode: an empty RL branch must not disturb the SFT branch of the same prompt pass."""
    model, tok, prompts = setup
    params = list(model.parameters())
    pp = pack_prompts(prompts[:1], "cpu")
    sft_ids = tok.encode("<guess>joy</guess>")
    sft = pack_rows(pp, [0], [sft_ids], [[True] * len(sft_ids)], SFT_ROW, None, "cpu")
    ids = [tok.encode("<guess>joy")]
    rl = pack_rows(pp, [0], ids, [[False] * len(ids[0])], RL_ROW, [1.0], "cpu")
    args = LossArgs(mode="gta")
    (sft_grads, sft_out), (rl_grads, rl_out) = ((r.grads, r.loss) for r in forward_backward(
        model, params, [branch(sft, None, None, 1.0, args), branch(rl, None, 1000.0, 1.0, args)]))
    assert torch.isfinite(sft_out.loss) and sft_out.loss.item() > 0 and not all_zero(sft_grads)
    assert rl_out.loss.item() == 0.0 and all_zero(rl_grads)
    [sft_alone] = forward_backward(model, params, [branch(sft, None, None, 1.0, args)])
    alone = sft_alone.grads
    assert all(torch.equal(a, b) for a, b in zip(sft_grads, alone))
    # The gradient constraint against a zero RL gradient leaves the SFT gradient as it is.
    for mode in ("project", "gate"):
        stats = apply_gradient_constraint(params, sft_grads, [torch.zeros_like(g) for g in rl_grads], mode)
        assert stats.cosine.item() == 0.0
        assert all(torch.equal(p.grad, g) for p, g in zip(params, alone))
    for p in params:
        p.grad = None
