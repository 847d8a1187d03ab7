"""Rewards per parse outcome and group-normalized advantages against hand-computed values."""

import math
import statistics

import pytest
import torch

from gtacore.completions import Parsed
from gtacore.rewards import batch_rewards, group_advantages, reward, zero_variance_groups

LABELS = ["joy", "sadness", "fear"]


@pytest.mark.parametrize("parsed, gold, expected", [
    (Parsed("joy", "x", "joy", True), "joy", 2.0),
    (Parsed("joy", "x", "fear", True), "joy", 1.0),  # well-formed, wrong answer
    (Parsed("fear", "x", "joy", True), "joy", 2.0),  # the guess does not count, only the answer
    (Parsed(None, "x", "joy", False), "joy", 1.0),  # broken format, right answer
    (Parsed("joy", "x", None, False), "joy", 0.0),  # no answer at all
    (Parsed(None, None, "Joy", False), "joy", 0.0),  # case counts
])
def test_reward_cases(parsed, gold, expected):
    assert reward(parsed, gold) == expected
    assert reward(parsed, gold, w_format=0.25, w_acc=2.0) == 0.25 * parsed.format_ok + 2.0 * (parsed.answer == gold)


def test_batch_rewards():
    texts = [
        "<guess>joy</guess><think>glad</think><answer>joy</answer>",
        "<guess>joy</guess><think>glad</think><answer>fear</answer>",
        "Sure! <guess>joy</guess><think>glad</think><answer>joy</answer>",
        "<guess>joy</guess><think></think><answer>sadness</answer>",
        "",
    ]
    rewards, parsed = batch_rewards(texts, ["joy", "joy", "joy", "fear", "joy"], LABELS, "gta", w_format=0.5, w_acc=1.0)
    assert rewards.dtype == torch.float32 and rewards.shape == (5,)
    assert rewards.tolist() == [1.5, 0.5, 1.0, 0.0, 0.0]
    assert [p.format_ok for p in parsed] == [True, True, False, False, False]
    rewards, _ = batch_rewards(["joy", " fear ", "Joy"], ["joy", "joy", "joy"], LABELS, "sft")
    assert rewards.tolist() == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="not in the label set"):
        batch_rewards(["joy"], ["happiness"], LABELS, "sft")
    with pytest.raises(ValueError, match="2 gold labels"):
        batch_rewards(["joy"], ["joy", "joy"], LABELS, "sft")


def test_group_advantages_by_hand():
    rewards = torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # B=2 groups of G=4
    std = math.sqrt((1 + 1 + 0 + 0) / 3)  # unbiased: mean 1, squared deviations 1, 1, 0, 0
    expected = [1 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 0.0]
    std2 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    expected += [0.75 / (std2 + 1e-4)] + [-0.25 / (std2 + 1e-4)] * 3
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, rel=1e-6)
    dr = group_advantages(rewards, 4, scale_std=False)
    assert dr.tolist() == [1.0, -1.0, 0.0, 0.0, 0.75, -0.25, -0.25, -0.25]


def test_group_advantages_against_a_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (6 * 5,), generator=g).float() * 0.5  # B=6, G=5, ties and equal groups likely
    adv = group_advantages(rewards, 5, eps=1e-3)
    for b in range(6):
        r = rewards[b * 5 : (b + 1) * 5].tolist()
        for i in range(5):
            want = 0.0 if len(set(r)) == 1 else (r[i] - statistics.mean(r)) / (statistics.stdev(r) + 1e-3)
            assert adv[b * 5 + i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_group_advantages_degenerate_groups():
    equal = torch.tensor([0.7] * 7 + [1.3] * 7)  # float32 round-off: mean(7 x 0.7) != 0.7
    assert (equal[:7] - equal[:7].mean()).abs().max() > 0
    for scale_std in (True, False):
        assert torch.equal(group_advantages(equal, 7, scale_std=scale_std), torch.zeros(14))
    one = group_advantages(torch.tensor([1.0, 0.0, 2.0]), 1)
    assert torch.equal(one, torch.zeros(3)) and not one.isnan().any()
    with pytest.raises(ValueError, match="dividing"):
        group_advantages(torch.ones(7), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 4), 4)


def test_zero_variance_groups_is_the_share_of_groups_with_zero_advantages():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (40 * 3,), generator=g).float()  # B=40, G=3: some groups all equal
    share = zero_variance_groups(rewards, 3).item()
    zero_adv = [bool((a == 0).all()) for a in group_advantages(rewards, 3).view(-1, 3)]
    assert share == pytest.approx(sum(zero_adv) / 40) and 0 < share < 1
