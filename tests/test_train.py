"""End-to-end: train.py on a tiny random model and a tiny dataset, in each mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from train_fixtures import write_dataset, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24), write_dataset(root / "test.jsonl", 6, seed=1)


def _args(setup, out, mode, steps, *extra):
    model, data, test = setup
    return ["--model", str(model), "--data", str(data), "--eval-data", str(test), "--mode", mode, "--max-steps", str(steps),
            "--output-dir", str(out), "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "12", "--lr", "1e-3",
            "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("mode", ["gta", "grpo", "sft"])
def test_each_mode_trains_logs_evaluates_and_saves(setup, tmp_path, mode):
    out = tmp_path / mode
    train.main(_args(setup, out, mode, 2, "--beta", "0.05"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(isinstance(v, (int, float)) and v == v for v in r.values()), r  # numbers, no NaN
        if mode != "sft":
            assert {"reward_mean", "rl_loss", "format_rate", "kl", "clip_fraction", "entropy"} <= set(r)
        if mode != "grpo":
            assert "sft_loss" in r
        if mode == "gta":
            assert {"grad_cosine", "conflict_fraction", "conflict_fraction_elements", "guess_accuracy"} <= set(r)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["tag"] for e in evals] == ["before", "after"] and "weighted_f1" in evals[-1]
    # The final checkpoint loads in transformers with the same logits as ours.
    from gtacore import models

    ours = models.load_pretrained(out / "final")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4
    # Training moved the weights (grpo on a random model earns no reward, so no gradient).
    if mode == "grpo":
        return
    start = load_file(setup[0] / "model.safetensors")
    end = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_resume_is_bitwise_exact(setup, tmp_path):
    extra = ("--beta", "0.05", "--num-iterations", "2", "--save-every", "2", "--eval-every", "0")
    train.main(_args(setup, tmp_path / "full", "gta", 4, *extra))
    train.main(_args(setup, tmp_path / "part", "gta", 2, *extra))
    # Continue the stopped run to step 4 from its last checkpoint.
    train.main(_args(setup, tmp_path / "part", "gta", 4, *extra, "--resume"))
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_torchrun_two_ranks_end_identical(setup, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           *_args(setup, out, "gta", 2, "--beta", "0.05")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_shared_prefix_and_plain_paths_train_the_same(setup, tmp_path):
    for name, flag in (("shared", "--shared-prefix"), ("plain", "--no-shared-prefix")):
        train.main(_args(setup, tmp_path / name, "gta", 2, "--beta", "0.05", "--num-iterations", "2", flag, "--eval-every", "0"))
    a = load_file(tmp_path / "shared" / "final" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    start = load_file(setup[0] / "model.safetensors")
    for k in a:
        moved = (a[k] - start[k]).abs().max()
        assert (a[k] - b[k]).abs().max() <= 1e-3 * max(float(moved), 1e-6) + 1e-6, k
