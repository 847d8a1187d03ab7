"""The bf16-mixed recipe (`--precision bf16-mixed`, the default on CUDA) run on CPU under CPU autocast.

This is how the GPU recipe is proven without a GPU: the same autocast rules decide which ops run
in bf16, so a dtype clash (a bf16 value projection meeting an fp32 KV cache, an `out=` matmul that
skips autocast) fails here as it would on the first GPU rollout.

Tolerances are in units of bf16's rounding, u = 2^-8 (8 significant bits): every matmul input is
rounded once to bf16, a relative error of at most u/2 per element, which the fp32 accumulation
averages rather than adds. The loss, a mean over tokens, lands within u of fp32; the gradients,
through two layers of rounded activations, within 4u as a whole and 8u per parameter tensor.
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gtacore import models
import train
from gtacore.losses import Branch, forward_backward, logprobs
from gtacore.packing import RL_ROW, SFT_ROW, pack_prompts, pack_rows
from gtacore.parallel import compute_precision
from gtacore.kernels import LossSettings
from gtacore.models.generate import SamplingParams, compute_dtype, generate
from train_fixtures import write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
U = 2.0**-8  # bf16's unit roundoff
G = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24), write_dataset(root / "test.jsonl", 6, seed=1)


def _args(setup, out, mode, steps, *extra):
    model, data, test = setup
    return ["--model", str(model), "--data", str(data), "--eval-data", str(test), "--mode", mode, "--max-steps", str(steps),
            "--output-dir", str(out), "--batch-size", "2", "--group-size", str(G), "--max-new-tokens", "12", "--lr", "1e-3",
            "--no-progress", "--device", "cpu", "--precision", "bf16-mixed", *extra]


def _finite_metrics(out: Path, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(v == v and abs(v) != float("inf") for r in rows for v in r.values()), rows
    return rows


@pytest.mark.parametrize("mode, extra", [
    ("gta", ("--num-iterations", "2", "--beta", "0.05", "--shared-prefix")),
    ("gta", ("--no-shared-prefix",)),
    ("grpo", ("--num-iterations", "2", "--beta", "0.05", "--no-shared-prefix")),
    ("sft", ()),
])
def test_every_mode_trains_evaluates_and_saves_under_bf16_mixed(setup, tmp_path, mode, extra):
    train.main(_args(setup, tmp_path, mode, 2, *extra))
    _finite_metrics(tmp_path, 2)
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["tag"] for e in evals] == ["before", "after"]
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the fp32 master weights, not bf16 copies
    if mode != "grpo":  # grpo on a random model earns no reward, so no gradient
        start = load_file(setup[0] / "model.safetensors")
        assert any(not torch.equal(start[k], saved[k]) for k in start)


def test_resume_is_bitwise_exact_under_bf16_mixed(setup, tmp_path):
    extra = ("--beta", "0.05", "--num-iterations", "2", "--save-every", "2", "--eval-every", "0")
    train.main(_args(setup, tmp_path / "full", "gta", 4, *extra))
    train.main(_args(setup, tmp_path / "part", "gta", 2, *extra))
    train.main(_args(setup, tmp_path / "part", "gta", 4, *extra, "--resume"))
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_two_ranks_under_bf16_mixed(setup, tmp_path, shard):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           *_args(setup, tmp_path, "gta", 2, "--beta", "0.05", "--num-iterations", "2", "--shard", shard)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _finite_metrics(tmp_path, 2)
    assert {t.dtype for t in load_file(tmp_path / "final" / "model.safetensors").values()} == {torch.float32}


def _batch(model, seed=0):
    """Two prompts, G random continuations each with advantages, and a gold target per prompt."""
    g, V = torch.Generator().manual_seed(seed), model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 11)]
    conts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 8, 6, 9, 4, 7)]
    return prompts, conts, torch.randn(len(conts), generator=g).tolist()


def _step(model, precision, shared):
    prompts, conts, adv = _batch(model)
    rows = pack_prompts(prompts, CPU) if shared else prompts
    masks = [[True] * len(c) for c in conts]
    sft = pack_rows(rows, [0, 1], conts[:2], masks[:2], SFT_ROW, None, CPU)
    rl = pack_rows(rows, [c // G for c in range(len(conts))], conts, masks, RL_ROW, adv, CPU)
    settings = LossSettings(beta=0.0)
    with compute_precision(precision, CPU):
        return forward_backward(model, list(model.parameters()),
                                [Branch(sft, replace(settings, temperature=1.0)), Branch(rl, settings)])


@pytest.mark.parametrize("shared", [True, False])
def test_bf16_mixed_loss_and_gradients_are_within_bf16_rounding_of_fp32(setup, shared):
    model = models.load_pretrained(setup[0])
    for exact, mixed in zip(_step(model, "fp32", shared), _step(model, "bf16-mixed", shared)):
        a, b = exact.loss.loss.item(), mixed.loss.loss.item()
        assert abs(a - b) <= U * abs(a), (a, b)
        pairs = [(x, y) for x, y in zip(exact.grads, mixed.grads) if x is not None]
        assert all(y.dtype == torch.float32 for _, y in pairs)  # gradients reach the fp32 master weights
        whole = torch.cat([x.flatten() for x, _ in pairs]), torch.cat([y.flatten() for _, y in pairs])
        assert (whole[0] - whole[1]).norm() <= 4 * U * whole[0].norm()
        for x, y in pairs:
            assert (x - y).norm() <= 8 * U * x.norm() + 1e-12


def test_generated_logprobs_match_the_teacher_forced_bf16_forward(setup):
    """What rollout records is what the first update's forward computes (ratios of 1), in bf16 too."""
    model = models.load_pretrained(setup[0]).eval()
    prompts, _, _ = _batch(model)
    params = SamplingParams(max_new_tokens=10, num_samples=G, temperature=1.0)
    with compute_precision("bf16-mixed", CPU):
        assert compute_dtype(model.lm_head.weight) == torch.bfloat16  # so the KV cache is bf16

        gen = generate(model, prompts, params, [2], 0, generator=torch.Generator().manual_seed(1))
        comps = [[t for t, m in zip(r, keep) if m] for r, keep in zip(gen.tokens.tolist(), gen.mask.tolist())]
        rows = pack_rows(pack_prompts(prompts, CPU), gen.prompt_index.tolist(), comps, [[True] * len(c) for c in comps],
                         RL_ROW, [0.0] * len(comps), CPU)
        forced = logprobs(model, rows, params.temperature)
    sampled = gen.logprobs[gen.mask]
    # The same bf16 products in two layouts (cache decode vs packed prefix); only the order of
    # the fp32 sums differs. A wrong temperature, row or dtype is off by far more.
    torch.testing.assert_close(sampled, forced, atol=4 * U, rtol=U)
    fp32 = generate(model, prompts, params, [2], 0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(fp32.logprobs, gen.logprobs, atol=1e-6)  # autocast really took effect


def test_bf16_true_is_refused_with_the_reason(capsys, setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(_args(setup, tmp_path, "gta", 1)[:-2] + ["--precision", "bf16-true"])
    assert e.value.code == 2
    assert "--precision bf16-true" in capsys.readouterr().err
