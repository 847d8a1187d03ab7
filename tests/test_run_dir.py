"""One run per output folder: a fresh run never mixes into another run's logs and checkpoints,
--overwrite replaces it only once the new run has been checked, --resume refuses flags that change
what the run is, a resumed run's logs hold each step once, and what it saves others can read."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import train
from gtacore.data import DataError
from gtacore.run_dir import RunFolderError
from train_fixtures import write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 12)


def _args(setup, out: Path, steps: int, *extra: str) -> list[str]:
    model, data = setup
    return ["--model", str(model), "--data", str(data), "--eval-data", str(data), "--max-eval-examples", "3",
            "--max-steps", str(steps), "--output-dir", str(out), "--batch-size", "2", "--group-size", "2",
            "--max-new-tokens", "8", "--device", "cpu", "--no-progress", *extra]


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
    """A finished 2-step run, checkpointed at each step; copied by each test that changes it."""
    out = tmp_path_factory.mktemp("first") / "run"
    train.main(_args(setup, out, 2, "--save-every", "1"))
    return out


@pytest.fixture
def run_copy(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


def test_a_fresh_run_into_a_run_folder_is_refused_and_changes_nothing(setup, run_copy):
    before = {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()}
    with pytest.raises(RunFolderError) as refused:
        train.main(_args(setup, run_copy, 3))
    message = str(refused.value)
    assert str(run_copy) in message and "--resume" in message and "--overwrite" in message
    assert {p.name: p.stat().st_mtime_ns for p in run_copy.iterdir()} == before
    assert _steps(run_copy / "metrics.jsonl") == [1, 2]
    assert all(0 <= json.loads(line)["zero_variance_groups"] <= 1 for line in (run_copy / "metrics.jsonl").open())


def test_replaying_a_run_config_into_its_own_folder_is_refused(setup, run_copy):
    with pytest.raises(RunFolderError, match="--overwrite"):
        train.main(["--config", str(run_copy / "config.json")])


def test_overwrite_replaces_the_old_run_whole(setup, run_copy):
    train.main(_args(setup, run_copy, 3, "--overwrite", "--mode", "grpo"))
    assert _steps(run_copy / "metrics.jsonl") == [1, 2, 3]
    assert [json.loads(line)["tag"] for line in (run_copy / "eval.jsonl").read_text().splitlines()] == ["before", "after"]
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-3"]  # the old 1 and 2 are gone
    assert json.loads((run_copy / "config.json").read_text())["loss"]["mode"] == "grpo"


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_its_checks(setup, run_copy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a row", "label": \n')
    model, _ = setup
    with pytest.raises(DataError):
        train.main(_args((model, bad), run_copy, 3, "--overwrite"))
    assert _steps(run_copy / "metrics.jsonl") == [1, 2]
    assert (run_copy / "checkpoint-2").is_dir() and (run_copy / "final" / "config.json").is_file()


def test_resume_refuses_flags_that_change_the_run(setup, run_copy):
    saved = (run_copy / "config.json").read_text()
    with pytest.raises(RunFolderError) as refused:
        train.main(_args(setup, run_copy, 4, "--resume", "--mode", "grpo", "--lr", "5e-2"))
    message = str(refused.value)
    assert "--mode 'gta' -> 'grpo'" in message and "--lr 2e-05 -> 0.05" in message
    assert (run_copy / "config.json").read_text() == saved


def test_resume_allows_cadence_and_length_and_logs_each_step_once(setup, run_copy):
    # A run killed after step 3's log line but before its checkpoint: checkpoint-2 is the newest.
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 0.0}) + "\n" + '{"step": 4, "rew')  # the kill cut this one
    shutil.rmtree(run_copy / "final")
    train.main(_args(setup, run_copy, 4, "--resume", "--eval-every", "1", "--save-total-limit", "1",
                     "--report-to", "none"))
    assert _steps(run_copy / "metrics.jsonl") == [1, 2, 3, 4]
    tags = [(r["step"], r["tag"]) for r in map(json.loads, (run_copy / "eval.jsonl").read_text().splitlines())]
    assert tags == [(0, "before"), (2, "after"), (3, "periodic"), (4, "after")]
    assert json.loads((run_copy / "config.json").read_text())["optim"]["max_steps"] == 4


def test_saved_folders_follow_the_umask(setup, tmp_path):
    old = os.umask(0o022)
    try:
        train.main(_args(setup, tmp_path / "run", 1))
    finally:
        os.umask(old)
    for folder in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoint-1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_resume_of_a_finished_run_has_nothing_to_do(setup, run_copy):
    before = (run_copy / "metrics.jsonl").read_text(), (run_copy / "eval.jsonl").read_text()
    with pytest.raises(SystemExit) as done:
        train.main(_args(setup, run_copy, 2, "--resume"))
    assert done.value.code == 0
    assert ((run_copy / "metrics.jsonl").read_text(), (run_copy / "eval.jsonl").read_text()) == before


def test_resume_refuses_max_steps_below_the_checkpoint(setup, run_copy):
    with pytest.raises(RunFolderError, match=r"checkpoint-2 is at step 2, past --max-steps 1"):
        train.main(_args(setup, run_copy, 1, "--resume"))


def test_resume_without_a_checkpoint_keeps_a_finished_final(setup, run_copy):
    for ckpt in run_copy.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    with pytest.raises(RunFolderError, match=r"holds final/ but no checkpoint to resume from; pass --overwrite"):
        train.main(_args(setup, run_copy, 2, "--resume"))
    assert (run_copy / "final" / "model.safetensors").is_file()


def test_a_replayed_config_never_resumes_or_overwrites_by_itself(run_copy):
    from gtacore.config import parse_config

    saved = json.loads((run_copy / "config.json").read_text())
    saved["run"].update(overwrite=True, resume=True)
    (run_copy / "replay.json").write_text(json.dumps(saved))
    cfg = parse_config(["--config", str(run_copy / "replay.json")])
    assert not cfg.run.overwrite and not cfg.run.resume


def test_resume_keeps_the_global_batch_on_other_rank_counts():
    from gtacore.config import Config
    from gtacore.run_dir import resume_changes

    saved, now = Config().to_dict(), Config().to_dict()
    saved["rollout"]["batch_size"], now["rollout"]["batch_size"] = 2, 4
    assert resume_changes(saved, now, 2, 1) == []  # 2 prompts x 2 ranks = 4 x 1
    assert resume_changes(saved, now, 2, 2) == ["--batch-size 2 x 2 rank(s) -> 4 x 2 (the global batch)"]
    assert resume_changes(saved, saved, None, 8) == []  # an old checkpoint: its rank count unknown
