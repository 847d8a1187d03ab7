"""Greedy evaluation: sharded over ranks, `--run` reproducing training's numbers, no worked examples from the test file."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gtacore.evaluate as ev
from gtacore import models
import train
from dist_eval_worker import SETTINGS, eval_args, load
from gtacore.models.tokenizer import Tokenizer
from train_fixtures import write_tiny_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
LABELS = ["mad", "lad", "eat"]  # single tokens of the tiny tokenizer: a one-token completion can be right
WORDS = "glad happy great furious mad annoyed scared afraid nervous item about feel".split()


def write_dataset(path: Path, n: int, seed: int, long_texts: bool) -> Path:
    """n rows of random words; with `long_texts` every 4th text is long, so a small --max-prompt-tokens cuts it."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choices(WORDS, k=30 if long_texts and i % 4 == 3 else rng.randint(2, 9))
            f.write(json.dumps({"text": " ".join(words), "label": LABELS[i % len(LABELS)]}) + "\n")
    return path


def write_sensitive_checkpoint(path: Path) -> Path:
    """The tiny random checkpoint with larger weights, so that greedy completions differ from
    prompt to prompt (at the default init every prompt gets the same one), and the labels'
    (tied) embeddings scaled up, so that a one-token completion is often a label."""
    base = write_tiny_checkpoint(path.with_name(path.name + "-base"))
    model = models.load_pretrained(base)
    tok = Tokenizer(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.ndim == 2 and "embed" not in name:
                w.normal_(0, 2 / w.shape[1] ** 0.5, generator=g)
        for label in LABELS:
            (token,) = tok.encode(label)
            model.model.embed_tokens.weight[token] *= 6
    return models.save_pretrained(model, path, tokenizer_dir=base)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return (write_sensitive_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 12, seed=0, long_texts=False),
            write_dataset(root / "test.jsonl", 11, seed=1, long_texts=True))


def test_sharded_evaluation_matches_one_process(setup, tmp_path):
    model_dir, _, test = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_eval_worker.py"), str(model_dir), str(test), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    model, tok, examples, labels = load(str(model_dir), str(test))
    assert len(examples) == 11
    for mode, max_new_tokens, max_prompt_tokens in SETTINGS:
        args = eval_args(model, tok, examples, labels, mode, max_new_tokens, max_prompt_tokens)
        one = json.loads(json.dumps(ev.evaluate(*args, truncate=True)))  # as the workers' JSON holds it
        predictions = [vars(p) for p in ev.predict(*args, truncate=True)]
        # Batches of 2 dealt round-robin: rank 0 decodes batches 0, 2, 4 and rank 1 batches 1, 3, 5.
        assert ranks[0][mode]["decoded_batches"] == [2, 2, 2] and ranks[1][mode]["decoded_batches"] == [2, 2, 1]
        for r in ranks:
            assert r[mode]["predictions"] == predictions, mode
            assert r[mode]["report"] == one, mode
        # Not a trivial report: some answers right, some wrong, some prompts cut.
        if mode == "sft":
            matrix = one["confusion"]["matrix"]
            assert 0 < one["accuracy"] < 1 and sum(row[-1] for row in matrix) < len(examples)
        assert one["truncated_prompts"] == 2
        assert len({p["completion"] for p in predictions}) > 2


@pytest.fixture(scope="module")
def trained_run(setup, tmp_path_factory):
    """A one-step sft run whose evaluation uses a seeded 7-of-11 sample, 2 worked examples and cut prompts."""
    model_dir, data, test = setup
    out = tmp_path_factory.mktemp("run") / "out"
    train.main(["--model", str(model_dir), "--data", str(data), "--eval-data", str(test), "--mode", "sft",
                "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "1", "--max-prompt-tokens", "250",
                "--shots", "2", "--seed", "3", "--max-eval-examples", "7", "--eval-batch-size", "2", "--lr", "1e-3",
                "--output-dir", str(out), "--no-progress", "--device", "cpu"])
    after = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-1]
    assert after["tag"] == "after" and after["n"] == 7 and after["truncated_prompts"] > 0
    return out, {k: v for k, v in after.items() if k not in ("step", "tag")}


@pytest.mark.parametrize("ranks", [1, 2])
def test_run_reproduces_training_after_numbers(trained_run, tmp_path, ranks):
    out, after = trained_run
    again = tmp_path / "again.json"
    if ranks == 1:
        ev.main(["--run", str(out), "--output", str(again)])
    else:  # torchrun's own parser would read "--run" as its --run-path
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "gtacore.evaluate", "--run-dir", str(out), "--output", str(again)]
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    report = json.loads(again.read_text())
    # Answers that depend on the prompt (more than one predicted column), so that other worked
    # examples, another sample or other prompt settings would show in the numbers.
    assert sum(any(row[j] for row in report["confusion"]["matrix"]) for j in range(len(LABELS) + 1)) > 1
    assert {k: v for k, v in report.items() if k != "samples"} == after


def test_worked_examples_never_come_from_the_test_file(setup, tmp_path, capsys):
    model_dir, _, test = setup
    for shots in ([], ["--shots", "1"]):  # the default is 1 worked example
        with pytest.raises(SystemExit):
            ev.main(["--model", str(model_dir), "--data", str(test), *shots])
        assert "--train-data" in capsys.readouterr().err
    # Without worked examples, the test file alone is enough.
    ev.main(["--model", str(model_dir), "--data", str(test), "--shots", "0", "--mode", "sft", "--max-new-tokens", "1",
             "--output", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["n"] == 11
