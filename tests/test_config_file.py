"""--config FILE: a run's config.json replays it; .toml / .yaml files with the same sections;
flags override the file; unknown keys name themselves and the file."""

import json

import pytest

import train
from gtacore.config import Config, parse_config
from train_fixtures import write_dataset, write_tiny_checkpoint


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[loss]\nmode = "grpo"\nbeta = 0.05\n[optim]\nlr = 1\n[run]\ndevice = "cpu"\n')
    cfg = parse_config(["--config", str(path), "--beta", "0.1"])
    assert cfg.loss.mode == "grpo" and cfg.loss.beta == 0.1 and cfg.optim.lr == 1.0  # int 1 read as the float field
    assert cfg.rollout.group_size == Config().rollout.group_size  # untouched: the default


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  group_size: 4\nrun:\n  device: cpu\n")
    assert parse_config(["--config", str(path)]).rollout.group_size == 4


@pytest.mark.parametrize("text, message", [
    ('{"loss": {"beta_typo": 1.0}}', "unknown key loss.beta_typo"),
    ('{"losses": {"beta": 1.0}}', "unknown section 'losses'"),
    ('{"rollout": {"group_size": "eight"}}', "rollout.group_size must be int, got 'eight'"),
    ('{"loss": ', "cannot read it as a config file"),
])
def test_bad_files_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and str(path) in err


def test_a_saved_config_replays_the_run(tmp_path):
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_dataset(tmp_path / "train.jsonl", 12)
    first = tmp_path / "first"
    train.main(["--model", str(model), "--data", str(data), "--mode", "gta", "--max-steps", "2", "--batch-size", "2",
                "--group-size", "2", "--max-new-tokens", "6", "--no-progress", "--device", "cpu", "--lr", "1e-3",
                "--output-dir", str(first)])
    again = tmp_path / "again"
    train.main(["--config", str(first / "config.json"), "--output-dir", str(again)])
    saved = json.loads((first / "config.json").read_text())
    replayed = json.loads((again / "config.json").read_text())
    assert replayed == saved | {"run": saved["run"] | {"output_dir": str(again)}}
    assert (first / "final" / "model.safetensors").read_bytes() == (again / "final" / "model.safetensors").read_bytes()
