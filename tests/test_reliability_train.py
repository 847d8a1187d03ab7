"""Training under faults: non-finite steps, long prompts, SIGKILL mid-checkpoint, a failing
rank under torchrun, bad data on every rank, degenerate settings, and a kill/resume soak."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from gtacore.run_dir import latest_checkpoint
from gtacore.data import DataError, Example
from gtacore.prompts import make_prompts
from gtacore.models.tokenizer import Tokenizer
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24), write_dataset(root / "test.jsonl", 6, seed=1)


def _args(setup, out, steps, *extra, eval_data=False):
    model, data, test = setup
    return ["--model", str(model), "--data", str(data), *(["--eval-data", str(test)] if eval_data else []),
            "--max-steps", str(steps), "--output-dir", str(out), "--batch-size", "2", "--group-size", "3",
            "--max-new-tokens", "12", "--lr", "1e-3", "--beta", "0.05", "--num-iterations", "2", "--no-progress",
            "--device", "cpu", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- non-finite loss or gradient ---

def _poison(monkeypatch, bad_calls: set[int], what: str):
    """Make the RL branch's gradient (or loss) NaN on the given backward calls (0-based)."""
    real, calls = train.forward_backward, {"n": 0}

    def backward(*args, **kwargs):
        results = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            rl = results[-1]
            if what == "grad":
                next(g for g in rl.grads if g is not None).view(-1)[0] = float("nan")
            else:
                rl.loss = rl.loss._replace(loss=rl.loss.loss * float("inf"))
        calls["n"] += 1
        return results

    monkeypatch.setattr(train, "forward_backward", backward)


@pytest.mark.parametrize("what", ["grad", "loss"])
def test_non_finite_update_is_skipped_and_counted(setup, tmp_path, monkeypatch, what):
    _poison(monkeypatch, {2}, what)  # mu = 2: calls 0, 1 are step 1; call 2 is step 2's first update
    train.main(_args(setup, tmp_path, 3, "--save-every", "1"))
    rows = _metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [0, 1, 0]
    assert [r["bad_steps_in_a_row"] for r in rows] == [0, 1, 0]
    # The skipped step changed nothing: its checkpoint equals the one before, optimizer included.
    assert _same_weights(tmp_path / "checkpoint-1", tmp_path / "checkpoint-2")
    a, b = (load_file(tmp_path / f"checkpoint-{s}" / "trainer_state.safetensors") for s in (1, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not _same_weights(tmp_path / "checkpoint-2", tmp_path / "final")  # step 3 trained again
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "final" / "model.safetensors").values())


def test_non_finite_steps_in_a_row_stop_the_run(setup, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(2, 100)), "grad")  # every update from step 2 on
    with pytest.raises(train.TrainingError, match=r"2 steps in a row had a non-finite loss or gradient.*checkpoint-2"):
        train.main(_args(setup, tmp_path, 6, "--save-every", "1", "--max-bad-steps", "2"))
    assert [r["skipped"] for r in _metrics(tmp_path)] == [0, 1, 1]
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoint-6").exists()


def test_non_finite_parameters_are_never_saved(setup, tmp_path, monkeypatch):
    # Weights that turn non-finite inside the optimizer step (finite loss and gradient).
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(train.TrainingError, match="parameters are not finite at step 1"):
        train.main(_args(setup, tmp_path, 3, "--save-every", "1"))
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.glob("*checkpoint-1*"))


def test_non_finite_gradient_on_one_rank_is_skipped_by_every_rank(setup, tmp_path):
    finals = {}
    for shard in ("ddp", "fsdp"):
        out = tmp_path / shard
        res = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "train_with_faults.py"), "nan-on-rank-1",
                              *_args(setup, out, 3, "--shard", shard)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
        # DDP ranks that decided differently would fail the replica check at the final checkpoint.
        assert res.returncode == 0, res.stderr[-3000:]
        assert [r["skipped"] for r in _metrics(out)] == [0, 1, 0]
        finals[shard] = load_file(out / "final" / "model.safetensors")
    # FSDP ranks that decided differently would have moved only some shards in step 2: not DDP's weights.
    start = load_file(setup[0] / "model.safetensors")
    for k, ddp in finals["ddp"].items():
        assert torch.isfinite(ddp).all()
        moved = float((ddp - start[k]).abs().max())
        assert float((ddp - finals["fsdp"][k]).abs().max()) <= 1e-3 * moved, k


# --- prompts longer than --max-prompt-tokens ---

def test_long_prompts_are_truncated_or_rejected(setup):
    tok = Tokenizer(setup[0])
    short = Example("I feel glad.", "joy", "short.jsonl:1")
    long = Example("I feel glad about item 3. " * 40, "joy", "long.jsonl:7")
    limit = len(make_prompts(tok, [short], LABELS, "gta", [], 10_000)[0].ids) + 20
    with pytest.raises(DataError, match=r"long\.jsonl:7: the prompt has \d+ tokens, more than --max-prompt-tokens"):
        make_prompts(tok, [short, long], LABELS, "gta", [], limit)
    kept, cut = make_prompts(tok, [short, long], LABELS, "gta", [], limit, truncate=True)
    assert not kept.truncated and cut.truncated
    assert limit - 5 <= len(cut.ids) <= limit  # cut to fit, not emptied
    assert "I feel glad about item 3." in cut.text and long.text not in cut.text
    # Worked examples alone over the limit: truncating the question cannot help.
    with pytest.raises(DataError, match="instructions and worked examples alone are too long"):
        make_prompts(tok, [short], LABELS, "gta", [long], limit, truncate=True)


def test_truncated_prompts_are_counted_in_the_metrics(setup, tmp_path):
    model, _, _ = setup
    data = tmp_path / "long.jsonl"
    rows = [{"text": ("I feel glad about it. " * (30 if i % 2 else 1)).strip(), "label": LABELS[i % 3]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = make_prompts(Tokenizer(model), [Example(rows[0]["text"], "joy", "x")], LABELS, "gta", [], 10**6)[0]
    short = ("--max-prompt-tokens", str(len(base.ids) + 40), "--shots", "0")
    train.main(_args((model, data, None), tmp_path / "run", 3, *short))
    assert sum(r["truncated_prompts"] for r in _metrics(tmp_path / "run")) > 0
    with pytest.raises(DataError, match=r"long\.jsonl:\d+: the prompt has"):
        train.main(_args((model, data, None), tmp_path / "strict", 3, *short, "--long-prompts", "error"))


# --- degenerate settings end to end ---

def test_group_of_one_and_no_eos_train_without_nan(setup, tmp_path):
    # G = 1: every advantage is 0; 3 new tokens: no completion ever ends.
    train.main(_args(setup, tmp_path, 2, "--group-size", "1", "--max-new-tokens", "3"))
    for r in _metrics(tmp_path):
        assert r["skipped"] == 0 and r["format_rate"] == 0 and r["completion_length"] == 3
        assert all(v is not None for v in r.values()), r


# --- SIGKILL in the middle of writing a checkpoint ---

def test_sigkill_during_checkpoint_write_keeps_the_previous_one(setup, tmp_path):
    marker = tmp_path / "stalled"
    out = tmp_path / "killed"
    args = _args(setup, out, 6, "--save-every", "2")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_with_faults.py"), f"stall-in-save:{marker}", *args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-write of checkpoint-4: its weights are on disk, its state is not
    proc.wait()
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "checkpoint-4").exists() and list(out.glob(".checkpoint-4.tmp-*"))
    # --resume continues from checkpoint-2, clears the debris, and ends where an unbroken run ends.
    # (All three runs are processes with the same thread count, so the floating-point sums agree.)
    for run_args in (args + ["--resume"], _args(setup, tmp_path / "unbroken", 6, "--save-every", "2")):
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *run_args], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    assert not list(out.glob(".checkpoint-*"))
    assert _same_weights(out / "final", tmp_path / "unbroken" / "final")


# --- torchrun: failures on one rank, bad data on every rank ---

def test_exception_on_one_rank_ends_the_job_promptly(setup, tmp_path):
    args = _args(setup, tmp_path / "run", 200, "--dist-timeout", "3600")
    start = time.time()
    res = subprocess.run([*TORCHRUN, str(ROOT / "tests" / "train_with_faults.py"), "raise-on-rank-1", *args],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    elapsed = time.time() - start
    assert res.returncode != 0
    assert "injected failure on rank 1 at step 2" in res.stderr
    # Far below the hour-long collective timeout: torchrun stopped rank 0, it did not time out.
    assert elapsed < 600, f"took {elapsed:.0f} s: rank 0 waited for a collective timeout"
    assert len(_metrics(tmp_path / "run")) <= 2


def test_bad_data_gives_the_same_error_under_torchrun(setup, tmp_path):
    model, data, _ = setup
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = '{"text": "broken row", "label": '
    bad.write_text("\n".join(lines) + "\n")
    args = _args((model, bad, None), tmp_path / "run", 2)
    with pytest.raises(DataError) as single:
        train.main(args)
    res = subprocess.run([*TORCHRUN, str(ROOT / "train.py"), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    assert str(single.value).startswith(f"{bad}:5: malformed JSON")
    assert res.stderr.count(str(single.value)) >= 2  # both ranks, word for word


# --- soak: 200 steps on 2 ranks, killed at a random step, resumed ---

def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))  # fields[1]: the parent pid
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.soak
def test_soak_kill_and_resume_matches_an_unbroken_run(setup, tmp_path):
    model, data, _ = setup
    args = lambda out: ["--model", str(model), "--data", str(data), "--max-steps", "200", "--output-dir", str(out),  # noqa: E731
                        "--batch-size", "1", "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--beta", "0.05",
                        "--num-iterations", "2", "--save-every", "10", "--no-progress", "--device", "cpu",
                        "--probe-every", "20"]  # the greedy probe too, but not at its default cadence of 4
    seed = int(os.environ.get("GTACORE_SOAK_SEED", random.randrange(10**6)))
    kill_after = random.Random(seed).randint(15, 185)
    print(f"GTACORE_SOAK_SEED={seed}: killing after step {kill_after}")
    out = tmp_path / "killed"
    proc = subprocess.Popen([*TORCHRUN, str(ROOT / "train.py"), *args(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 1200
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < kill_after:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    # A machine failure: the launcher and both ranks die at once, without warning. (torchrun
    # starts its workers in their own sessions, so killing its process group is not enough.)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while _processes_mentioning(str(out)):
        assert time.time() < deadline, "a rank outlived the kill and would race the resumed run"
        time.sleep(0.1)
    resume_from = latest_checkpoint(out)
    assert resume_from is not None and int(resume_from.name.split("-")[1]) <= kill_after
    for cmd_out, extra in ((out, ["--resume"]), (tmp_path / "unbroken", [])):
        res = subprocess.run([*TORCHRUN, str(ROOT / "train.py"), *args(cmd_out), *extra], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, res.stderr[-3000:]
    assert _same_weights(out / "final", tmp_path / "unbroken" / "final"), f"GTACORE_SOAK_SEED={seed}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201)), f"GTACORE_SOAK_SEED={seed}: the resumed log repeats or lacks steps"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_debris_of_killed_writes_is_cleaned_and_a_moved_aside_checkpoint_restored(tmp_path):
    from gtacore.run_dir import remove_partial_checkpoints

    for name in ("checkpoint-2", ".checkpoint-2.old-11", ".checkpoint-4.old-12", ".checkpoint-6.tmp-ab", ".final.tmp-cd",
                 ".checkpoint-8.state-shards", ".git"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
    removed = {p.name for p in remove_partial_checkpoints(tmp_path)}
    assert removed == {".checkpoint-2.old-11", ".checkpoint-6.tmp-ab", ".final.tmp-cd", ".checkpoint-8.state-shards"}
    # Killed between "move the old checkpoint-4 aside" and "move the new one in": the old one comes back.
    assert (tmp_path / "checkpoint-4" / "marker").read_text() == ".checkpoint-4.old-12"
    assert (tmp_path / "checkpoint-2" / "marker").read_text() == "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".git", "checkpoint-2", "checkpoint-4"]
