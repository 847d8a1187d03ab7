"""`train.py --dry-run`: what the model sees, printed before any weights are read."""

import pytest

from gtacore import models
import train
from gtacore.models.tokenizer import Tokenizer
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

pytest.importorskip("transformers")


@pytest.mark.parametrize("mode", ["gta", "sft", "grpo"])
def test_dry_run_prints_the_prompt_target_and_labels_then_exits(tmp_path, capsys, monkeypatch, mode):
    model = write_tiny_checkpoint(tmp_path / "model")
    data = write_dataset(tmp_path / "train.jsonl", 12)
    monkeypatch.setattr(models, "load_pretrained", lambda *a, **k: pytest.fail("--dry-run read the weights"))
    train.main(["--model", str(model), "--data", str(data), "--mode", mode, "--dry-run", "--device", "cpu",
                "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"labels ({len(LABELS)}): {', '.join(sorted(LABELS))}" in out
    prompt = out.split("as the model receives them ---\n", 1)[1].split("\n--- end of prompt", 1)[0]
    tok = Tokenizer(model)
    assert "<|im_start|>system" in prompt and prompt.endswith("<|im_start|>assistant\n")  # special tokens shown
    assert tok.decode(tok.encode(prompt)) == prompt
    assert ("SFT target" in out) == (mode != "grpo")
    if mode == "gta":
        assert "<guess>" in out.split("SFT target", 1)[1]
    assert not (tmp_path / "run").exists()
