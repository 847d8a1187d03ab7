"""--shard fsdp on CPU with gloo: FSDP2 against DDP, the constraint on shards, sharded checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24), write_dataset(root / "test.jsonl", 6, seed=1)


def _train(setup, out, steps, *extra, ranks=2, batch=2):
    model, data, test = setup
    args = ["--model", str(model), "--data", str(data), "--eval-data", str(test), "--max-steps", str(steps),
            "--output-dir", str(out), "--batch-size", str(batch), "--group-size", "3", "--max-new-tokens", "12",
            "--lr", "1e-3", "--beta", "0.05", "--num-iterations", "2", "--eval-every", "0", "--no-progress",
            "--device", "cpu", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    res = subprocess.run([sys.executable, *launcher, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return load_file(out / "final" / "model.safetensors")


def test_sharded_gradients_constraint_and_checkpoints(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_fsdp_worker.py"), str(setup[0]), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["conflicts"] == reports[1]["conflicts"]
    assert sorted((tmp_path / "sharded-ckpt").glob("trainer_state-*-of-00002.safetensors"))[1].name.startswith("trainer_state-00001")


def test_fsdp_and_ddp_train_the_same(setup, tmp_path):
    ddp = _train(setup, tmp_path / "ddp", 3, "--shard", "ddp")
    fsdp = _train(setup, tmp_path / "fsdp", 3, "--shard", "fsdp")
    others = {  # the same training through other paths
        "fsdp-plain": _train(setup, tmp_path / "fsdp-plain", 3, "--shard", "fsdp", "--no-shared-prefix"),
        "fsdp-ac": _train(setup, tmp_path / "fsdp-ac", 3, "--shard", "fsdp", "--activation-checkpointing"),
    }
    start = load_file(setup[0] / "model.safetensors")
    assert ddp.keys() == fsdp.keys() == start.keys()  # the same HF layout (tied head stored once)
    for k in ddp:
        moved = float((ddp[k] - start[k]).abs().max())
        assert moved > 0, k
        assert float((ddp[k] - fsdp[k]).abs().max()) <= 1e-3 * moved, k
        for name, weights in others.items():
            assert float((ddp[k] - weights[k]).abs().max()) <= 1e-3 * moved, (name, k)
    rows = [[json.loads(line) for line in (tmp_path / m / "metrics.jsonl").read_text().splitlines()] for m in ("ddp", "fsdp")]
    for a, b in zip(*rows):
        for key in ("reward_mean", "sft_loss", "rl_loss", "kl", "train_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_fsdp_resume_is_exact_and_works_on_other_rank_counts(setup, tmp_path):
    full = _train(setup, tmp_path / "full", 4, "--shard", "fsdp", "--save-every", "2")
    _train(setup, tmp_path / "part", 2, "--shard", "fsdp", "--save-every", "2")
    assert len(list((tmp_path / "part" / "checkpoint-2").glob("trainer_state-*.safetensors"))) == 2
    resumed = _train(setup, tmp_path / "part", 4, "--shard", "fsdp", "--save-every", "2", "--resume")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # The same checkpoint on one process (same global batch): unsharded, and sharded over one rank.
    for shard in ("ddp", "fsdp"):
        out = tmp_path / f"one-{shard}"
        out.mkdir()
        os.symlink(tmp_path / "part" / "checkpoint-2", out / "checkpoint-2")
        _train(setup, out, 3, "--shard", shard, "--resume", ranks=1, batch=4)
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 3
        # AdamW continued from the loaded state: 2 updates per step, 3 steps (a fresh one would count 2).
        state = load_file(out / "checkpoint-3" / "trainer_state.safetensors")
        assert {float(v) for k, v in state.items() if k.endswith(".step")} == {6.0}


def test_optimizer_rows_assemble_from_uneven_shards(tmp_path):
    """Three shard files with uneven row splits (and one empty) load into an unsharded optimizer."""
    from safetensors.torch import save_file

    from gtacore.checkpointing import load_trainer_state
    from gtacore.run_dir import STATE_JSON
    from gtacore.models.checkpoint import CheckpointError

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(2))]
    full = {0: {"exp_avg": torch.randn(10, 3), "exp_avg_sq": torch.rand(10, 3)}, 1: {"exp_avg": torch.randn(2), "exp_avg_sq": torch.rand(2)}}
    splits = {0: [(0, 4), (4, 8), (8, 10)], 1: [(0, 1), (1, 2), (2, 2)]}  # torch.chunk's split of 10 and of 2 rows in 3
    names = [f"trainer_state-{r:05d}-of-00003.safetensors" for r in range(3)]
    for r, name in enumerate(names):
        tensors = {f"optimizer.{i}.{k}": v[splits[i][r][0]:splits[i][r][1]].contiguous() for i in full for k, v in full[i].items()}
        tensors.update({f"optimizer.{i}.step": torch.tensor(7.0) for i in full})
        save_file(tensors, str(tmp_path / name), metadata={"rows": json.dumps({str(i): list(splits[i][r]) for i in full})})
    groups = [{"params": [0, 1], "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
               "decoupled_weight_decay": True}]
    (tmp_path / STATE_JSON).write_text(json.dumps({"step": 7, "state_files": names, "optimizer_param_groups": groups}))
    opt = torch.optim.AdamW(weights, lr=1e-3)
    assert load_trainer_state(tmp_path, opt)["step"] == 7
    for i, p in enumerate(weights):
        for k, v in full[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)
        assert float(opt.state[p]["step"]) == 7.0
    # A missing piece is an error naming the tensor, not a silently short state.
    (tmp_path / names[1]).unlink()
    (tmp_path / STATE_JSON).write_text(json.dumps({"step": 7, "state_files": [names[0], names[2]], "optimizer_param_groups": groups}))
    with pytest.raises(CheckpointError, match=r"optimizer\.0\.exp_avg.* covers 6 of the rows 0:10"):
        load_trainer_state(tmp_path, torch.optim.AdamW(weights, lr=1e-3))


@pytest.mark.gpu
def test_fsdp_mixed_precision_on_gpu(setup, tmp_path):
    """bf16 gathers, fp32 reduction, the bf16 rollout copy and fused AdamW on sharded parameters:
    a run that trains, writes a checkpoint transformers loads, and resumes."""
    import transformers

    from gtacore import models

    model, data, test = setup
    args = ["--model", str(model), "--data", str(data), "--eval-data", str(test), "--output-dir", str(tmp_path),
            "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "12", "--lr", "1e-3", "--beta", "0.05",
            "--num-iterations", "2", "--save-every", "2", "--eval-every", "0", "--no-progress", "--device", "cuda",
            "--shard", "fsdp"]
    for steps, extra in ((2, []), (4, ["--resume"])):
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--max-steps", str(steps), *extra], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not any(r["skipped"] for r in rows)
    ours = models.load_pretrained(tmp_path / "final")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4
