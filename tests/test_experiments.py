"""The experiment scripts' inputs: the ticket dataset is what its generator writes, balanced, with
held-out situations, and every collapse variant's flags parse as a valid train.py configuration
(so a typo fails here, not ten minutes into an experiment)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gtacore.config import config_problems, parse_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TICKETS = {"train": EXPERIMENTS / "data" / "tickets_train.jsonl", "test": EXPERIMENTS / "data" / "tickets_test.jsonl"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ticket_generator_reproduces_committed_files(tmp_path):
    subprocess.run([sys.executable, str(EXPERIMENTS / "make_tickets.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for path in TICKETS.values():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), (
            f"{path.name} differs from what experiments/make_tickets.py writes; rerun it and commit the result")


def test_tickets_are_balanced_and_test_situations_are_held_out():
    tickets = _load("make_tickets")
    rows = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in TICKETS.items()}
    for split, n in (("train", 200), ("test", 60)):
        assert Counter(r["label"] for r in rows[split]) == {label: n for label in tickets.SITUATIONS}
    texts = {split: " ".join(r["text"].lower() for r in rs) for split, rs in rows.items()}
    for label, situations in tickets.SITUATIONS.items():
        for i, situation in enumerate(situations):
            held_out = i % 4 == 3
            assert (situation.lower() in texts["train"]) != held_out, (label, situation)
            assert (situation.lower() in texts["test"]) == held_out, (label, situation)


@pytest.mark.parametrize("name", list(_load("collapse").VARIANTS))
def test_every_collapse_variant_is_a_valid_configuration(name):
    flags = list(_load("collapse").VARIANTS[name][0])
    cfg = parse_config([*flags, "--device", "cpu"])
    assert config_problems(cfg) == []


def test_collapse_table_keeps_earlier_rows_and_their_commit(tmp_path):
    collapse = _load("collapse")
    earlier = {"variant": "default", "seed": 0, "accuracy": 0.5, "macro_f1": 0.4, "test_majority_share": 0.3,
               "train_majority_share": 0.3, "minutes": 9.0, "commit": "abc1234", "machine": "x86_64", "torch": "2.13.0"}
    path = tmp_path / "earlier.csv"
    collapse.write_results(tmp_path, [earlier])
    (tmp_path / "results.csv").rename(path)
    rows = [collapse.previous_row(r) for r in csv.DictReader(open(path))]
    assert rows == [earlier]
    new = {k: v for k, v in earlier.items() if k not in ("commit", "machine", "torch")} | {"seed": 1, "accuracy": 0.7}
    collapse.write_results(tmp_path, [*rows, new])
    written = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["commit"] for r in written][0] == "abc1234" and written[1]["commit"] != "abc1234"
    assert "| default (the defaults) | 0,1 | 0.600 (0.500-0.700) |" in (tmp_path / "results.md").read_text()


TINY_RUN = ["--max-steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "8",
            "--max-eval-examples", "3", "--shots", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run_flags(tmp_path_factory):
    from train_fixtures import write_dataset, write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    model, data = write_tiny_checkpoint(folder / "model"), write_dataset(folder / "data.jsonl", 12)
    return ["--model", str(model), "--data", str(data), "--eval-data", str(data), *TINY_RUN]


@pytest.mark.slow
def test_collapse_script_runs_end_to_end(tmp_path, tiny_run_flags):
    """One variant, one seed, a tiny model: train.py, then the whole-test-split evaluation, then the table."""
    out = tmp_path / "collapse"
    subprocess.run([sys.executable, str(EXPERIMENTS / "collapse.py"), "--out", str(out), "--runs", "kl:0", "--",
                    *tiny_run_flags], check=True, capture_output=True, timeout=600)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["variant"], r["seed"]) for r in rows] == [("kl", "0")]
    assert 0 <= float(rows[0]["accuracy"]) <= 1 and (out / "results.md").is_file()


@pytest.mark.slow
def test_compare_modes_script_runs_end_to_end(tmp_path, tiny_run_flags):
    out = tmp_path / "compare"
    flags = list(tiny_run_flags)
    del flags[flags.index("--max-steps"):flags.index("--max-steps") + 2]  # the script's own flag
    subprocess.run([sys.executable, str(EXPERIMENTS / "compare_modes.py"), "--out", str(out), "--max-steps", "1",
                    "--", *flags], check=True, capture_output=True, timeout=600)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["mode"] for r in rows] == ["sft", "grpo", "gta"] and (out / "curves.png").is_file()
