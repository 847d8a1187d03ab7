"""gtacore.kernels.gta_loss: the per-token objective against a Python loop, the loss against float64."""

import math
import os

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GTACORE_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from gtacore.kernels import LossSettings, gta_loss, gta_token_objective  # noqa: E402
from gtacore.kernels.gta_loss import gta_loss_reference, gta_row_weights  # noqa: E402
from gtacore.kernels.selective_logprobs import selective_logprobs_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V = 37, 1000
VALUE_TOL = dict(atol=2e-5, rtol=1e-5)  # fp32 kernel vs float64 reference
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)


def objective_by_hand(logp, old, adv, ref, eps_low, eps_high, beta):
    """One token at a time with math.exp: (objective, ratio, clipped, kl, d objective / d logp)."""
    ratio = math.exp(logp - old)
    unclipped = ratio * adv
    clipped = min(max(ratio, 1 - eps_low), 1 + eps_high) * adv
    objective, is_clipped = min(unclipped, clipped), clipped < unclipped
    grad = 0.0 if is_clipped else ratio * adv  # the clipped term is constant in logp
    kl = 0.0
    if ref is not None:
        kl = math.exp(ref - logp) - (ref - logp) - 1
        objective -= beta * kl
        grad -= beta * (1 - math.exp(ref - logp))
    return objective, ratio, is_clipped, kl, grad


def make_batch(kinds: str, seed: int = 0):
    """Logits and per-row inputs; old log-probs spread so ratios land on both sides of the clip."""
    torch.manual_seed(seed)
    logits = (3 * torch.randn(N, V, device=DEVICE)).requires_grad_()
    targets = torch.randint(0, V, (N,), device=DEVICE)
    row_kind = {
        "mixed": torch.randint(0, 3, (N,), device=DEVICE),
        "no_sft": torch.randint(0, 2, (N,), device=DEVICE) * 2,
        "sft_only": torch.ones(N, dtype=torch.long, device=DEVICE),
        "no_rows": torch.zeros(N, dtype=torch.long, device=DEVICE),
    }[kinds]
    logp = selective_logprobs_reference(logits.detach(), targets).logprobs
    old = logp + 0.5 * torch.randn(N, device=DEVICE)  # |log ratio| ~ 0.5: many clipped
    ref = logp + 0.3 * torch.randn(N, device=DEVICE)
    advantages = torch.randn(N, device=DEVICE)
    seq_ids = torch.arange(N, device=DEVICE) // 5  # sequences of 5 tokens
    return logits, targets, row_kind, old, advantages, ref, seq_ids


def test_token_objective_matches_python_loop():
    torch.manual_seed(0)
    n = 400
    logp = (-3 * torch.rand(n, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.6 * torch.randn(n, dtype=torch.float64)
    ref = logp.detach() + 0.3 * torch.randn(n, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64)
    adv[::17] = 0.0
    eps_low, eps_high, beta = 0.2, 0.28, 0.04
    token = gta_token_objective(logp, old, adv, ref, eps_low, eps_high, beta)
    (grad,) = torch.autograd.grad(token.objective.sum(), logp)
    rows = [objective_by_hand(*(t[i].item() for t in (logp, old, adv, ref)), eps_low, eps_high, beta) for i in range(n)]
    expected = [torch.tensor(column, dtype=torch.float64) for column in zip(*rows)]
    for got, want in zip((token.objective, token.ratio, token.clipped.double(), token.kl, grad), expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-12, rtol=1e-12)
    clipped, positive = token.clipped, adv > 0
    assert (clipped & positive).any() and (clipped & ~positive).any() and (~clipped).any()
    assert not clipped[adv == 0].any()


@pytest.mark.parametrize("kinds", ["mixed", "no_sft", "sft_only", "no_rows"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_matches_reference(kinds, agg, beta):
    logits, targets, row_kind, old, advantages, ref, seq_ids = make_batch(kinds)
    settings = LossSettings(eps_low=0.2, eps_high=0.28, beta=beta, temperature=0.7, agg=agg, loss_normalizer=50.0)
    kwargs = dict(settings=settings, seq_ids=seq_ids)
    ref_or_none = ref if beta else None
    out = gta_loss(logits, targets, row_kind, old, advantages, ref_or_none, **kwargs)
    logits64 = logits.detach().double().requires_grad_()
    expected = gta_loss_reference(logits64, targets, row_kind, old, advantages, ref_or_none, **kwargs)
    for name in ("sft_loss", "rl_loss"):
        got, want = getattr(out, name), getattr(expected, name)
        torch.testing.assert_close(got.double(), want, **VALUE_TOL, msg=name)
        # Each loss is differentiable on its own: the gradient constraint needs g_sft and g_rl apart.
        (grad,) = torch.autograd.grad(got, logits, retain_graph=True)
        (want_grad,) = torch.autograd.grad(want, logits64, retain_graph=True)
        torch.testing.assert_close(grad.double(), want_grad, **GRAD_TOL, msg=name)
        assert torch.isfinite(got)
    for name, value in out.stats.items():
        torch.testing.assert_close(value.double(), expected.stats[name].double(), **VALUE_TOL, msg=name)
    if kinds in ("no_sft", "no_rows"):
        assert out.sft_loss.item() == 0.0
    if kinds in ("sft_only", "no_rows"):
        assert out.rl_loss.item() == 0.0


def test_sft_loss_is_cross_entropy_of_sft_rows():
    logits, targets, row_kind, old, advantages, _, _ = make_batch("mixed", seed=1)
    out = gta_loss(logits, targets, row_kind, old, advantages)
    sft = row_kind == 1
    expected = torch.nn.functional.cross_entropy(logits[sft].detach().double(), targets[sft])
    torch.testing.assert_close(out.sft_loss.double(), expected, **VALUE_TOL)


def test_clipped_tokens_get_no_policy_gradient():
    logits, targets, row_kind, old, advantages, _, _ = make_batch("no_sft", seed=2)
    out = gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(eps_low=0.1, eps_high=0.1))
    clipped = out.stats["clipped"]
    rl = row_kind == 2
    assert (clipped & (advantages > 0)).any() and (clipped & (advantages < 0)).any()
    assert (rl & ~clipped).any() and not clipped[~rl].any()
    (grad,) = torch.autograd.grad(out.rl_loss, logits)
    row_norm = grad.abs().sum(-1)
    assert torch.equal(row_norm[clipped | ~rl], torch.zeros_like(row_norm[clipped | ~rl]))
    assert (row_norm[rl & ~clipped & (advantages != 0)] > 0).all()


def test_seq_mean_is_mean_of_sequence_means():
    logits, targets, row_kind, old, advantages, _, seq_ids = make_batch("mixed", seed=3)
    seq_ids = torch.randperm(N, device=DEVICE)[seq_ids]  # arbitrary ids in [0, N)
    out = gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(agg="seq_mean"), seq_ids=seq_ids)
    token = gta_token_objective(out.stats["logprobs"], old, advantages)
    rl = row_kind == 2
    sequence_means = [token.objective[rl & (seq_ids == s)].mean() for s in seq_ids[rl].unique()]
    torch.testing.assert_close(out.rl_loss, -torch.stack(sequence_means).mean(), **VALUE_TOL)


def test_inputs_of_other_rows_are_ignored():
    logits, targets, row_kind, old, advantages, ref, _ = make_batch("mixed", seed=4)
    clean = gta_loss(logits, targets, row_kind, old, advantages, ref, LossSettings(beta=0.05))
    not_rl = row_kind != 2
    dirty_inputs = [t.masked_fill(not_rl, float("nan")) for t in (old, advantages, ref)]
    dirty_targets = targets.masked_fill(row_kind == 0, -100)
    dirty = gta_loss(logits, dirty_targets, row_kind, *dirty_inputs[:2], dirty_inputs[2], LossSettings(beta=0.05))
    assert torch.equal(clean.sft_loss, dirty.sft_loss) and torch.equal(clean.rl_loss, dirty.rl_loss)
    (grad,) = torch.autograd.grad(dirty.sft_loss + dirty.rl_loss, logits)
    assert torch.isfinite(grad).all()


def test_row_weights_sum_to_one():
    row_kind = torch.tensor([0, 1, 2, 2, 1, 2, 0, 2], device=DEVICE)
    seq_ids = torch.tensor([0, 0, 0, 0, 5, 5, 5, 3], device=DEVICE)
    for agg in ("token_mean", "seq_mean"):
        sft_weight, rl_weight = gta_row_weights(row_kind, agg, seq_ids)
        torch.testing.assert_close(sft_weight.sum().item(), 1.0)
        torch.testing.assert_close(rl_weight.sum().item(), 1.0)
    _, rl_weight = gta_row_weights(row_kind, "seq_mean", seq_ids)
    torch.testing.assert_close(rl_weight[[2, 3, 5, 7]], torch.tensor([1 / 6, 1 / 6, 1 / 3, 1 / 3], device=DEVICE))
    _, rl_weight = gta_row_weights(row_kind, "constant", loss_normalizer=8.0)
    torch.testing.assert_close(rl_weight.sum().item(), 0.5)


def test_bad_arguments_raise():
    logits, targets, row_kind, old, advantages, _, _ = make_batch("mixed")
    with pytest.raises(ValueError, match="ref_logprobs"):
        gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(beta=0.1))
    with pytest.raises(ValueError, match="seq_ids"):
        gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(agg="seq_mean"))
    with pytest.raises(ValueError, match="loss_normalizer"):
        gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(agg="constant"))
    with pytest.raises(ValueError, match="agg"):
        gta_loss(logits, targets, row_kind, old, advantages, settings=LossSettings(agg="sum"))
