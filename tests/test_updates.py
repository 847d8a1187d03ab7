"""mu > 1 (the paper's num_iterations = 4): every update of a step sees a fresh gradient.

The bug these tests guard against: after an optimizer step p.grad still held the combined
gradient, and the next update's backward added into it, so from the second update on each
update applied a running sum (and the gradient constraint saw a polluted g_sft). The bitwise
resume test cannot see it (an uninterrupted and a resumed run are polluted alike); these can:
with lr 0 and no clipping the parameters never move, so every update must apply exactly the
mu = 1 gradient, and with a real learning rate a mu = 2 step must equal two updates driven by
hand from the same rollouts and old log-probs.
"""

import json
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from gtacore.config import parse_config
from gtacore.data import load_examples
from gtacore.distributed import DistInfo
from gtacore.losses import Branch, branch_loss, head_weight, logprobs, loss_row_hidden
from gtacore.packing import RL_ROW, SFT_ROW, pack_rows
from gtacore.prompts import make_prompts, sft_targets
from gtacore.rewards import group_advantages
from gtacore.rollout import rollout
from gtacore.models import load_pretrained
from gtacore.models.tokenizer import Tokenizer
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint
from update_probe import record_updates, scripted_rewards

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("updates")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24)


def _args(setup, out, *extra):
    model, data = setup
    return ["--model", str(model), "--data", str(data), "--max-steps", "1", "--output-dir", str(out),
            "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "10", "--beta", "0.05",
            "--no-progress", "--device", "cpu", *extra]


def _applied(setup, out, *extra) -> list[torch.Tensor]:
    with record_updates() as applied, scripted_rewards():
        train.main(_args(setup, out, "--lr", "0", "--max-grad-norm", "0", *extra))
    return applied


@pytest.mark.parametrize("prefix", ["--shared-prefix", "--no-shared-prefix"])
@pytest.mark.parametrize("mode", ["gta", "grpo", "sft"])
def test_every_update_sees_the_mu1_gradient(setup, tmp_path, mode, prefix):
    (once,) = _applied(setup, tmp_path / "mu1", "--mode", mode, prefix)
    assert once.norm() > 0
    mu = 4 if mode == "gta" else 2
    updates = _applied(setup, tmp_path / f"mu{mu}", "--mode", mode, prefix, "--num-iterations", str(mu))
    assert len(updates) == mu
    for i, g in enumerate(updates):
        # Not bitwise: old log-probs (mu > 1) come from a separate no-grad forward.
        assert torch.allclose(g, once, rtol=1e-4, atol=1e-7), (i, (g - once).norm() / once.norm())


def test_ddp_and_fsdp_updates_see_the_mu1_gradient(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_update_worker.py"), str(tmp_path),
           *_args(setup, tmp_path, "--lr", "0", "--max-grad-norm", "0")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    norms = json.loads((tmp_path / "norms.json").read_text())
    for shard in ("ddp", "fsdp"):
        (once,) = norms[f"{shard}-mu1"]
        assert once > 0 and len(norms[f"{shard}-mu4"]) == 4
        assert norms[f"{shard}-mu4"] == pytest.approx([once] * 4, rel=1e-4), shard


def _project(g_sft: torch.Tensor, g_rl: torch.Tensor) -> torch.Tensor:
    """docs/method.md's projection for one tensor, written out: drop g_sft's component against g_rl."""
    dot = (g_sft * g_rl).sum()
    return g_sft - dot / g_rl.square().sum() * g_rl if dot < 0 else g_sft


def test_mu2_step_equals_two_hand_driven_updates(setup, tmp_path):
    argv = _args(setup, tmp_path / "run", "--lr", "1e-2", "--num-iterations", "2", "--no-shared-prefix")
    cfg = parse_config(argv)
    L, R = cfg.loss, cfg.rollout
    info = DistInfo()
    model_dir = setup[0]
    tok = Tokenizer(model_dir)
    examples = load_examples(setup[1], labels=LABELS).examples[:2]
    prompts = make_prompts(tok, examples, LABELS, "gta", [], 1024)

    def fresh():
        torch.manual_seed(0)
        policy = load_pretrained(model_dir).train()
        params = [p for p in policy.parameters() if p.requires_grad]
        return policy, params, torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=0.0)

    ref = load_pretrained(model_dir).eval().requires_grad_(False)
    policy, params, opt = fresh()
    start = [p.detach().clone() for p in params]
    with scripted_rewards():
        train.train_step(cfg, 0, policy, policy, ref, tok, prompts, LABELS, opt, info)
    stepped = [p.detach().clone() for p in params]

    # By hand: the same rollouts (same generator), then two plain updates.
    policy, params, opt = fresh()
    G = R.group_size
    with scripted_rewards():
        ro = rollout(policy, tok, prompts, "gta", R, train.step_generator(cfg, 0, info))
        rewards, _ = train.batch_rewards(ro.texts, [prompts[r // G].example.label for r in range(len(ro.texts))], LABELS,
                                         "gta", L.w_format, L.w_acc)
    advantages = group_advantages(rewards, G, scale_std=L.scale_std)
    parent = [r // G for r in range(len(ro.completions))]
    rl = pack_rows([p.ids for p in prompts], parent, ro.completions, ro.rl_masks, RL_ROW, advantages.tolist(), "cpu")
    sft = pack_rows([p.ids for p in prompts], range(len(prompts)), *sft_targets(tok, prompts, "gta"), SFT_ROW, None, "cpu")
    old, ref_lp = logprobs(policy, rl, R.temperature), logprobs(ref, rl, R.temperature)
    settings = L.settings(R.temperature, R.batch_size * R.group_size * R.max_new_tokens)
    assert advantages.abs().sum() > 0

    def loss(branch):
        return branch_loss(loss_row_hidden(policy, branch.rows), head_weight(policy), branch).loss

    for _ in range(2):
        g_sft = torch.autograd.grad(loss(Branch(sft, replace(settings, temperature=1.0, beta=0.0))), params)
        g_rl = torch.autograd.grad(loss(Branch(rl, settings, old, ref_lp)), params)
        combined = [_project(s, r) + r for s, r in zip(g_sft, g_rl)]
        norm = torch.cat([g.reshape(-1) for g in combined]).norm()
        scale = min(1.0, cfg.optim.max_grad_norm / (norm.item() + 1e-6))
        for p, g in zip(params, combined):
            p.grad = g * scale
        opt.step()
    moved = max((a - s).abs().max().item() for a, s in zip(stepped, start))
    assert moved > 1e-3
    worst = max((a - b).abs().max().item() for a, b in zip(stepped, params))
    assert worst <= 1e-3 * moved, (worst, moved)
