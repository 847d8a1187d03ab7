"""A user's first hour: each mistake ends in one clear line naming the fix, the reward function is
checked before any model loads, the small things a new user trips on, and a tiny model to try it all."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from gtacore import evaluate, plot
from gtacore.config import config_file_values, parse_config
from gtacore.errors import main_with_user_errors
from gtacore.rewards import RewardFnError, batch_rewards, load_reward_fn
from gtacore.run_data import load_run_data
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
REWARDS = """
def two(parsed, golds):
    return [0.0] * len(parsed)


def boom(parsed, golds, labels):
    raise KeyError("no such label")


def half(parsed, golds, labels):
    return [0.5] * len(parsed)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    model, data = write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 12)
    run = root / "run"
    train.main(["--model", str(model), "--data", str(data), "--max-steps", "1", "--batch-size", "2", "--group-size",
                "2", "--max-new-tokens", "6", "--device", "cpu", "--no-progress", "--output-dir", str(run)])
    return model, data, run


def one_line_error(main, monkeypatch, capsys, prog="train.py") -> str:
    """What a command prints for a user error: exactly one line on stderr, exit status 2."""
    monkeypatch.setattr(sys, "argv", [prog])
    monkeypatch.delenv("GTACORE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        main_with_user_errors(main)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


def test_the_command_line_prints_one_line_and_debug_shows_the_traceback(setup, tmp_path):
    model, data, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"text": "cut short", "label": \n')
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(bad), "--device", "cpu",
           "--output-dir", str(tmp_path / "run")]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1] == f"train.py: error: {bad}:13: malformed JSON" + \
        plain.stderr.strip().split(f"{bad}:13: malformed JSON", 1)[1]
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "GTACORE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_a_run_folder_as_model_points_to_final(setup, monkeypatch, capsys):
    model, data, run = setup
    args = ["--model", str(run), "--data", str(data), "--device", "cpu", "--output-dir", str(run.parent / "other")]
    err = one_line_error(lambda: train.main(args), monkeypatch, capsys)
    assert f"--model {run} is a run folder" in err and f"use {run / 'final'}" in err
    err = one_line_error(lambda: evaluate.main(["--model", str(run), "--data", str(data), "--shots", "0"]),
                         monkeypatch, capsys, "evaluate.py")
    assert f"use {run / 'final'}" in err


def test_a_filter_that_matches_nothing_lists_the_values(setup, monkeypatch, capsys):
    model, data, run = setup
    args = ["--model", str(model), "--data", str(data), "--filter", "label=happy", "--device", "cpu",
            "--output-dir", str(run.parent / "filtered")]
    err = one_line_error(lambda: train.main(args), monkeypatch, capsys)
    assert f"label has {', '.join(sorted(LABELS))}" in err and "--filter label=happy matches none of 12 rows" in err


def test_plot_of_a_folder_that_is_no_run(tmp_path, monkeypatch, capsys):
    err = one_line_error(lambda: plot.main([str(tmp_path)]), monkeypatch, capsys, "plot.py")
    assert "no metrics.jsonl" in err


def test_a_config_file_key_gets_a_did_you_mean_and_yaml_reads_1e_3_as_a_float(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text("[optim]\nlearning_rate = 0.1\nmax_step = 3\n")
    with pytest.raises(ValueError, match=r"unknown key optim\.learning_rate"):
        config_file_values(typo)
    typo.write_text("[optim]\nmax_step = 3\n")
    with pytest.raises(ValueError, match=r"unknown key optim\.max_step; did you mean optim\.max_steps\?"):
        config_file_values(typo)
    pytest.importorskip("yaml")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optim:\n  lr: 1e-3\n  max_steps: 3\n")
    assert config_file_values(yaml_file) == {"optim.lr": 0.001, "optim.max_steps": 3}


def test_reward_fn_signature_is_checked_before_anything_loads(tmp_path, capsys):
    (tmp_path / "first_hour_rewards.py").write_text(REWARDS)
    with pytest.raises(SystemExit) as exited:
        parse_config(["--reward-fn", f"{tmp_path / 'first_hour_rewards.py'}:two"])
    assert exited.value.code == 2
    assert "two(parsed, golds) cannot be called as fn(parsed, golds, labels)" in capsys.readouterr().err


def test_an_exception_in_the_reward_fn_names_it_and_the_step(tmp_path):
    (tmp_path / "first_hour_rewards.py").write_text(REWARDS)
    fn = load_reward_fn(f"{tmp_path / 'first_hour_rewards.py'}:boom")
    with pytest.raises(RewardFnError, match=r"reward function boom \(step 3\) raised KeyError: 'no such label'"):
        batch_rewards(["<think>a</think><answer>joy</answer>"], ["joy"], LABELS, "grpo", reward_fn=fn, step=3)


def test_reward_fn_module_in_the_working_folder(setup, tmp_path):
    """`module:function` finds a module in the current folder, as `python -m` does."""
    model, data, _ = setup
    (tmp_path / "myrewards_here.py").write_text(REWARDS)
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--reward-fn", "myrewards_here:half", "--model",
                          str(model), "--data", str(data), "--dry-run", "--device", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_integer_labels_named_on_the_command_line(tmp_path):
    rows = tmp_path / "ints.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 3}) + "\n" for i in range(6)))
    with pytest.raises(ValueError, match=r"--label-names NAME0,NAME1"):
        load_run_data(parse_config(["--data", str(rows), "--device", "cpu"]), say=lambda *_: None)
    data = load_run_data(parse_config(["--data", str(rows), "--label-names", "neg,neutral,pos", "--device", "cpu"]),
                         say=lambda *_: None)
    assert [e.label for e in data.train.examples] == ["neg", "neutral", "pos"] * 2


def test_the_log_says_what_filter_kept_and_when_nothing_is_evaluated(setup):
    _, data, _ = setup
    said = []
    load_run_data(parse_config(["--data", str(data), "--filter", "label=joy", "--device", "cpu"]), say=said.append)
    assert "--filter label=joy: --data kept 4 of 12 rows" in said
    assert any("no --eval-data" in line for line in said)


def test_help_prints_each_default_once():
    outputs = [subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True).stdout,
               evaluate.build_parser().format_help()]
    for out in outputs:
        options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
        twice = [o.split()[0] for o in options if o.count("default:") > 1]
        assert not twice, twice


def test_evaluate_has_its_own_help_and_no_progress():
    text = evaluate.build_parser().format_help()
    assert "--no-progress" in text
    options = {o.split()[0]: " ".join(o.split()) for o in re.split(r"\n  (?=-)", text)}
    assert "evaluation file" in options["--filter"] and "with --run, the run's" in options["--precision"]


def test_the_summary_names_before_and_after(setup, tmp_path, capsys):
    model, data, _ = setup
    train.main(["--model", str(model), "--data", str(data), "--eval-data", str(data), "--max-eval-examples", "3",
                "--max-steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6", "--device",
                "cpu", "--no-progress", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert re.search(r"recall per class\s+before\s+after", out) and re.search(r"metric\s+before\s+after", out)


def test_tiny_model_trains_and_transformers_loads_it(tmp_path, monkeypatch):
    from gtacore.models import convert_gguf, tiny

    import transformers

    monkeypatch.setattr(convert_gguf, "find_smollm2_gguf", lambda: None)  # the trained tokenizer
    tiny.main([str(tmp_path / "tiny")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert hf.config.num_hidden_layers == 2
    train.main(["--model", str(tmp_path / "tiny"), "--max-steps", "1", "--batch-size", "2", "--group-size", "2",
                "--max-new-tokens", "6", "--max-eval-examples", "2", "--device", "cpu", "--no-progress",
                "--output-dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
