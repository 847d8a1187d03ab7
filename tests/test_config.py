"""Every configuration value is checked before any work starts; errors name the flag and the value."""

import pytest

import train
from gtacore.config import Config, config_problems, parse_config


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--group-size", "-2"], "--group-size must be >= 1, got -2"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--num-iterations", "0"], "--num-iterations must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
    (["--shots", "-1"], "--shots must be >= 0, got -1"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--top-p", "1.5"], "--top-p must be <= 1, got 1.5"),
    (["--lr=-1e-5"], "--lr must be >= 0, got -1e-05"),
    (["--beta", "-0.1"], "--beta must be >= 0, got -0.1"),
    (["--eps-low", "1"], "--eps-low must be < 1"),
    (["--mode", "grpo", "--group-size", "1"], "--group-size 1 in grpo mode"),
    (["--w-format", "0", "--w-acc", "0"], "every reward is 0"),
    (["--mode", "sft", "--lambda-sft", "0"], "no loss is left in sft mode"),
    (["--eval-data", "test.jsonl"], "--eval-data test.jsonl without --data"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_bad_values_are_refused_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--output-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_defaults_and_paper_settings_pass():
    assert config_problems(Config()) == []
    cfg = parse_config(["--num-iterations", "4", "--group-size", "16", "--beta", "0.01", "--mode", "gta"])
    assert cfg.loss.num_iterations == 4
    # gta with G = 1 still trains its guess by SFT: allowed.
    assert parse_config(["--group-size", "1"]).rollout.group_size == 1


def test_gpu_defaults_apply_to_flags_left_out(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = parse_config(["--group-size", "4"])
    assert (cfg.rollout.batch_size, cfg.rollout.group_size, cfg.loss.beta) == (8, 4, 0.01)  # given flags win
    assert parse_config(["--device", "cpu"]).rollout.batch_size == 4  # --device cpu keeps the CPU defaults
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    assert "(default: 4; 8 on a GPU)" in capsys.readouterr().out  # --help shows both
