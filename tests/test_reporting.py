"""--report-to tensorboard,wandb: the same scalars as metrics.jsonl / eval.jsonl, read back with
each tool's own reader (W&B offline: no network)."""

import json
import struct

import pytest

import train
from gtacore.config import parse_config
from train_fixtures import write_dataset, write_tiny_checkpoint


def test_unknown_or_missing_integration_is_refused(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse_config(["--report-to", "tensorboard,mlflow"])
    assert "--report-to mlflow: unknown" in capsys.readouterr().err
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        parse_config(["--report-to", "wandb"])
    assert "pip install wandb" in capsys.readouterr().err


def test_tensorboard_and_wandb_offline_hold_the_logged_values(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_dataset(tmp_path / "train.jsonl", 12)
    test = write_dataset(tmp_path / "test.jsonl", 4, seed=1)
    out = tmp_path / "out"
    train.main(["--model", str(model), "--data", str(data), "--eval-data", str(test), "--max-steps", "3",
                "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6", "--no-progress", "--device", "cpu",
                "--output-dir", str(out), "--report-to", "tensorboard,wandb", "--run-name", "tiny"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/sft_loss")] == [m["step"] for m in metrics]
    for m in metrics:
        assert next(e.value for e in events.Scalars("train/sft_loss") if e.step == m["step"]) == pytest.approx(m["sft_loss"])
    assert [e.step for e in events.Scalars("eval/accuracy")] == [e["step"] for e in evals]

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, summary = wandb_records(runs[0])
    assert history["train/sft_loss"] == pytest.approx([m["sft_loss"] for m in metrics])
    assert summary["train/sft_loss"] == pytest.approx(metrics[-1]["sft_loss"])
    assert summary["eval/accuracy"] == pytest.approx(evals[-1]["accuracy"])


def wandb_records(path):
    """(history {key: [values]}, summary {key: value}) from an offline run's .wandb file: W&B's
    protobuf Records in LevelDB's log format (7-byte file header; 32 KiB blocks of records, each
    with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, history, summary = path.read_bytes(), 7, b"", {}, {}
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending, pos = pending + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif record.WhichOneof("record_type") == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
    return history, summary
