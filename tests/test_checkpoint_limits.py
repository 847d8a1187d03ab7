"""Checkpoints that fit on a disk: --save-total-limit (crash-safe deletion), --save-dtype bfloat16
(exact resume from the fp32 parameters kept in the trainer state), and final/ sharing the last
checkpoint's weight files."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gtacore.checkpointing as ckpt
from gtacore import models
import train
from gtacore.run_dir import DELETING, latest_checkpoint, remove_old_checkpoints, remove_partial_checkpoints
from gtacore.config import parse_config
from gtacore.models.checkpoint import CheckpointError, link_pretrained
from train_fixtures import write_dataset, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24)


def _args(setup, out, steps, *extra):
    model, data = setup
    return ["--model", str(model), "--data", str(data), "--max-steps", str(steps), "--output-dir", str(out),
            "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "12", "--lr", "1e-3", "--beta", "0.05",
            "--num-iterations", "2", "--no-progress", "--device", "cpu", *extra]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _dtypes(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_logits_in_transformers(folder: Path) -> None:
    ours = models.load_pretrained(folder, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def limited(setup, tmp_path_factory):
    """4 steps, a checkpoint every step, --save-total-limit 2; an incomplete checkpoint-0 lies in the
    output folder from the start. Records, at each deletion, whether the newest checkpoint was complete."""
    out = tmp_path_factory.mktemp("limited") / "run"
    (out / "checkpoint-0").mkdir(parents=True)
    (out / "checkpoint-0" / "model.safetensors").write_text("not a checkpoint")
    calls, real = [], ckpt.remove_old_checkpoints

    def spy(output_dir, keep_last, protect=()):
        newest = latest_checkpoint(output_dir)
        calls.append((newest.name, (newest / ckpt.STATE_JSON).is_file(), keep_last, [Path(p).name for p in protect if p]))
        return real(output_dir, keep_last, protect)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "remove_old_checkpoints", spy)
        train.main(_args(setup, out, 4, "--save-every", "1", "--save-total-limit", "2"))
    return out, calls


def test_limit_keeps_the_newest_complete_checkpoints(limited):
    out, calls = limited
    # Exactly the 2 newest complete ones; the incomplete checkpoint-0 is not touched; no debris.
    assert _checkpoints(out) == ["checkpoint-0", "checkpoint-3", "checkpoint-4"]
    assert (out / "checkpoint-0" / "model.safetensors").read_text() == "not a checkpoint"
    assert _hidden(out) == []
    # Deletion ran after every save, once the just-written checkpoint was complete and protected.
    assert calls == [(f"checkpoint-{s}", True, 2, [f"checkpoint-{s}"]) for s in (1, 2, 3, 4)]
    assert latest_checkpoint(out) == out / "checkpoint-4"


def test_final_shares_the_last_checkpoints_weight_files(limited, tmp_path):
    out, _ = limited
    final, last = out / "final", out / "checkpoint-4"
    assert (final / "model.safetensors").stat().st_ino == (last / "model.safetensors").stat().st_ino
    assert (final / "model.safetensors").stat().st_nlink == 2
    assert (final / "config.json").stat().st_ino != (last / "config.json").stat().st_ino  # small files copied
    assert not list(final.glob("trainer_state*"))
    assert json.loads((final / "config.json").read_text())["torch_dtype"] == "float32"
    _same_logits_in_transformers(final)
    # --save-total-limit deleting the checkpoint final/ shares its files with leaves final/ whole.
    run = tmp_path / "run"
    shutil.copytree(out, run)  # copies break the links: make them again
    assert link_pretrained(run / "checkpoint-4", run / "final")
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-5")  # a newer checkpoint
    weights = load_file(run / "final" / "model.safetensors")
    assert remove_old_checkpoints(run, 1) == [run / "checkpoint-4", run / "checkpoint-3"]
    assert _checkpoints(run) == ["checkpoint-0", "checkpoint-5"]
    assert (run / "final" / "model.safetensors").stat().st_nlink == 1
    assert _equal(load_file(run / "final" / "model.safetensors"), weights)
    _same_logits_in_transformers(run / "final")


def test_final_is_copied_where_hard_links_are_refused(limited, tmp_path, monkeypatch):
    out, _ = limited

    def refuse(src, dst, *a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    assert link_pretrained(out / "checkpoint-4", tmp_path / "final") is False
    assert (tmp_path / "final" / "model.safetensors").stat().st_ino != (out / "checkpoint-4" / "model.safetensors").stat().st_ino
    assert _equal(load_file(tmp_path / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors"))
    assert _hidden(tmp_path) == []


def test_the_checkpoint_a_run_resumed_from_is_never_deleted(setup, limited, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(limited[0], run)
    train.main(_args(setup, run, 6, "--save-every", "1", "--save-total-limit", "1", "--resume"))
    # Resumed from checkpoint-4: checkpoint-3 and checkpoint-5 went, checkpoint-4 stays beside the newest.
    assert _checkpoints(run) == ["checkpoint-0", "checkpoint-4", "checkpoint-6"]
    assert (run / "final" / "model.safetensors").stat().st_ino == (run / "checkpoint-6" / "model.safetensors").stat().st_ino


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


def test_kill_during_deletion_is_cleaned_up_and_resume_is_exact(setup, limited, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if DELETING in Path(path).name:  # half of the folder is gone when the kill comes
            (Path(path) / "model.safetensors").unlink()
            (Path(path) / "trainer_state.safetensors").unlink()
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):  # saving checkpoint-2 deletes checkpoint-1
        train.main(_args(setup, out, 4, "--save-every", "1", "--save-total-limit", "1"))
    monkeypatch.setattr(shutil, "rmtree", real)
    # The half-deleted folder is hidden, not a checkpoint-1 that holds its trainer_state.json but lacks files.
    assert _checkpoints(out) == ["checkpoint-2"]
    [debris] = _hidden(out)
    assert debris.startswith(".checkpoint-1" + DELETING) and (out / debris / ckpt.STATE_JSON).is_file()
    assert latest_checkpoint(out) == out / "checkpoint-2"
    # --resume clears it, continues from checkpoint-2 (kept: it is the resume source) and ends exactly
    # where the unbroken run ended.
    train.main(_args(setup, out, 4, "--save-every", "1", "--save-total-limit", "1", "--resume"))
    assert _hidden(out) == [] and _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert _equal(load_file(out / "final" / "model.safetensors"), load_file(limited[0] / "final" / "model.safetensors"))


def _fake_checkpoint(folder: Path, step: int) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.safetensors", ckpt.STATE_JSON):
        (path / name).write_text(str(step))
    return path


def test_failed_deletion_is_reported_hidden_and_cleaned_next_start(tmp_path, monkeypatch, capsys):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    elsewhere = _fake_checkpoint(tmp_path / "other", 0)
    os.symlink(elsewhere, tmp_path / "checkpoint-0")  # a linked-in checkpoint: only the link may go
    (tmp_path / "checkpoint-9").mkdir()  # incomplete: never touched
    real = shutil.rmtree

    def busy(path, *args, ignore_errors=False, **kwargs):
        (Path(path) / "model.safetensors").unlink(missing_ok=True)
        if ignore_errors:
            return None
        raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    monkeypatch.setattr(shutil, "rmtree", busy)
    removed = remove_old_checkpoints(tmp_path, 1)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert removed == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-1", tmp_path / "checkpoint-0"]
    assert "could not delete" in capsys.readouterr().err
    assert _checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-9"]
    assert len(_hidden(tmp_path)) == 2  # checkpoint-1 and -2, half deleted; the symlink is gone already
    assert (elsewhere / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert len(remove_partial_checkpoints(tmp_path)) == 2
    assert _hidden(tmp_path) == [] and _checkpoints(tmp_path) == ["checkpoint-3", "checkpoint-9"]
    assert remove_old_checkpoints(tmp_path, 0) == []  # 0 keeps all


@pytest.fixture(scope="module")
def bf16_part(setup, tmp_path_factory):
    """2 of the 4 steps of `limited`, saved with --save-dtype bfloat16."""
    out = tmp_path_factory.mktemp("bf16") / "part"
    train.main(_args(setup, out, 2, "--save-every", "2", "--save-dtype", "bfloat16"))
    return out


def test_save_dtype_bfloat16_writes_bf16_weights_and_fp32_trainer_state(bf16_part):
    ck = bf16_part / "checkpoint-2"
    for folder in (ck, bf16_part / "final"):
        assert _dtypes(folder / "model.safetensors") == {"BF16"}
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (bf16_part / "final" / "model.safetensors").stat().st_ino == (ck / "model.safetensors").stat().st_ino
    state = load_file(ck / "trainer_state.safetensors")
    assert {t.dtype for t in state.values()} == {torch.float32}
    # The exact fp32 parameters are in the trainer state; the weight files hold them rounded to bf16.
    policy = models.load_pretrained(ck, dtype=torch.bfloat16)
    params = [p for p in policy.parameters() if p.requires_grad]
    masters = [state[f"master.{i}"] for i in range(len(params))]
    assert all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(masters, params))
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)
    # transformers loads the bf16 folder as it is, and agrees with us.
    hf = transformers.AutoModelForCausalLM.from_pretrained(bf16_part / "final", dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    _same_logits_in_transformers(bf16_part / "final")


@pytest.mark.parametrize("save_dtype", ["bfloat16", None])
def test_resume_from_a_bf16_checkpoint_is_exact(setup, limited, bf16_part, tmp_path, save_dtype):
    run = tmp_path / "run"
    shutil.copytree(bf16_part, run)
    train.main(_args(setup, run, 4, "--save-every", "2", "--resume", *(["--save-dtype", save_dtype] if save_dtype else [])))
    unbroken = load_file(limited[0] / "final" / "model.safetensors")  # fp32, never interrupted
    final = load_file(run / "final" / "model.safetensors")
    if save_dtype is None:  # back to fp32 weight files: the unbroken run's, bit for bit
        assert _equal(final, unbroken)
        assert "master.0" not in load_file(run / "checkpoint-4" / "trainer_state.safetensors")
    else:
        assert _equal(final, {k: v.to(torch.bfloat16) for k, v in unbroken.items()})
        state = load_file(run / "checkpoint-4" / "trainer_state.safetensors")
        ours = models.load_pretrained(limited[0] / "final")
        params = [p for p in ours.parameters() if p.requires_grad]
        assert all(torch.equal(state[f"master.{i}"], p) for i, p in enumerate(params))


def test_resume_refuses_bf16_weights_without_the_exact_parameters(setup, bf16_part, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bf16_part, run)
    file = run / "checkpoint-2" / "trainer_state.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    state = {k: v for k, v in load_file(file).items() if not k.startswith("master.")}
    save_file(state, str(file), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"checkpoint-2: its weights are torch.bfloat16 .* lacks the exact ones"):
        train.main(_args(setup, run, 4, "--resume"))


def test_flags_are_checked(tmp_path):
    cfg = parse_config(["--save-total-limit", "3", "--save-dtype", "bfloat16", "--device", "cpu"])
    assert (cfg.run.save_total_limit, cfg.run.save_dtype) == (3, "bfloat16")
    assert (parse_config(["--device", "cpu"]).run.save_total_limit, parse_config(["--device", "cpu"]).run.save_dtype) == (0, None)
    for bad in (["--save-total-limit", "-1"], ["--save-dtype", "float16"]):
        with pytest.raises(SystemExit):
            parse_config(bad + ["--device", "cpu"])


def test_fsdp_ranks_keep_their_rows_of_the_exact_parameters(setup, tmp_path):
    """2 FSDP ranks with --save-dtype bfloat16 and --save-total-limit 1: each rank writes its rows of
    the fp32 parameters; one unsharded process reassembles them exactly."""
    import subprocess
    import sys

    from gtacore.checkpointing import load_trainer_state

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fsdp"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(root / "train.py"), *_args(setup, out, 2, "--shard", "fsdp", "--save-every", "1",
                                                         "--save-total-limit", "1", "--save-dtype", "bfloat16")],
                         cwd=root, env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ck = out / "checkpoint-2"
    assert _checkpoints(out) == ["checkpoint-2"] and _hidden(out) == []
    assert (out / "final" / "model.safetensors").stat().st_ino == (ck / "model.safetensors").stat().st_ino
    assert _dtypes(ck / "model.safetensors") == {"BF16"}
    policy = models.load_pretrained(ck, dtype=torch.float32)  # the rounded weights...
    params = [p for p in policy.parameters() if p.requires_grad]
    load_trainer_state(ck, torch.optim.AdamW(params, lr=1e-3))  # ...replaced by the exact ones
    shards = [load_file(ck / f"trainer_state-{r:05d}-of-00002.safetensors") for r in range(2)]
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), torch.cat([s[f"master.{i}"] for s in shards])), i
    assert any(not torch.equal(p, p.to(torch.bfloat16).float()) for p in params)
