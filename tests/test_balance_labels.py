"""--balance-labels: every gold label in a step's batch pulls the RL loss with equal total weight.
Checked on known rollouts: the factors, the loss's gradient against the per-label means written out
in float64, the global batch over ranks, and a training step through train.py."""

import json

import pytest
import torch

from gtacore.kernels import LossSettings, gta_loss
from gtacore.rewards import label_balance

LABELS = ["anger", "joy", "fear"]


def test_factors_give_each_present_label_an_equal_share():
    golds, units = ["joy", "joy", "joy", "fear"], [2.0, 1.0, 3.0, 4.0]  # joy: 6 units, fear: 4, anger: absent
    factors = label_balance(golds, units, LABELS)
    assert torch.allclose(factors, torch.tensor([10 / 12, 10 / 12, 10 / 12, 10 / 8]))
    shares = {y: sum(f * u for f, u, g in zip(factors.tolist(), units, golds) if g == y) for y in ("joy", "fear")}
    assert shares["joy"] == pytest.approx(shares["fear"]) == pytest.approx(sum(units) / 2)
    assert torch.equal(label_balance(["joy"] * 3, [1.0, 2.0, 3.0], LABELS), torch.ones(3))  # one label: unchanged
    assert torch.equal(label_balance(["joy", "fear"], [3.0, 3.0], LABELS), torch.ones(2))  # already balanced


def test_gradient_is_the_mean_over_labels_of_each_labels_token_mean():
    """token_mean, mu = 1 (ratio 1), no KL: dL/dlogits = -(1/K) sum_y (1/U_y) sum_{i in y} A_i dlogp_i."""
    torch.manual_seed(0)
    V = 13
    tokens = [3, 1, 2, 4, 2]  # RL tokens of 5 rollouts
    golds = ["joy", "joy", "fear", "joy", "anger"]
    adv = torch.randn(5, dtype=torch.float64)
    rows = torch.tensor([r for r, n in enumerate(tokens) for _ in range(n)])  # rollout of each token row
    N = len(rows)
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    factors = label_balance(golds, [float(n) for n in tokens], LABELS).double()
    logp = torch.log_softmax(logits.detach(), -1)[torch.arange(N), targets]
    out = gta_loss(logits, targets, torch.full((N,), 2), logp, (adv * factors)[rows], None,
                   LossSettings(agg="token_mean", beta=0.0))
    (grad,) = torch.autograd.grad(out.rl_loss, logits)

    dlogp = torch.nn.functional.one_hot(targets, V).double() - torch.softmax(logits.detach(), -1)  # [N, V]
    expected = torch.zeros(N, V, dtype=torch.float64)
    present = sorted(set(golds))
    for y in present:
        mine = [i for i in range(N) if golds[rows[i]] == y]
        for i in mine:
            expected[i] = -adv[rows[i]] * dlogp[i] / (len(mine) * len(present))
    torch.testing.assert_close(grad, expected)


def test_ranks_scale_by_the_global_batch():
    golds = [["joy", "joy", "fear"], ["anger", "joy"]]
    units = [[2.0, 2.0, 1.0], [5.0, 1.0]]
    union = label_balance(sum(golds, []), sum(units, []), LABELS)
    totals = [torch.zeros(3, dtype=torch.float64) for _ in golds]

    def fake_all_reduce(rank):
        def reduce(t):
            totals[rank] = t
            return sum(t_other for t_other in per_rank_counts)
        return reduce

    index = {y: k for k, y in enumerate(LABELS)}
    per_rank_counts = []
    for g, u in zip(golds, units):
        c = torch.zeros(3, dtype=torch.float64)
        for y, n in zip(g, u):
            c[index[y]] += n
        per_rank_counts.append(c)
    parts = [label_balance(g, u, LABELS, fake_all_reduce(r)) for r, (g, u) in enumerate(zip(golds, units))]
    assert torch.equal(torch.cat(parts), union)
    assert all(torch.equal(t, c) for t, c in zip(totals, per_rank_counts))  # each rank sent its own counts


def test_a_balanced_training_step(tmp_path):
    pytest.importorskip("transformers")
    import train
    from train_fixtures import write_dataset, write_tiny_checkpoint

    model, data = write_tiny_checkpoint(tmp_path / "model"), write_dataset(tmp_path / "train.jsonl", 12)
    for agg in ("token_mean", "seq_mean"):
        out = tmp_path / f"run-{agg}"
        train.main(["--model", str(model), "--data", str(data), "--balance-labels", "--agg", agg, "--max-steps", "2",
                    "--batch-size", "3", "--group-size", "2", "--max-new-tokens", "8", "--device", "cpu",
                    "--no-progress", "--output-dir", str(out)])
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and all(s["skipped"] == 0 for s in steps)
        assert json.loads((out / "config.json").read_text())["loss"]["balance_labels"] is True
