"""--reward-fn module:function replaces the built-in reward; its output is checked."""

import json
import math

import pytest

import train
from gtacore.rewards import batch_rewards, load_reward_fn
from gtacore.config import parse_config
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

REWARDS = '''
import math

ORDER = ["anger", "fear", "joy"]


def adjacent_credit(parsed, golds, labels):
    """1 for the gold label, 0.5 for a neighbour in ORDER, 0 otherwise (SST-5-style partial credit)."""
    out = []
    for p, y in zip(parsed, golds):
        if p.answer not in ORDER:
            out.append(0.0)
        else:
            out.append(max(0.0, 1.0 - 0.5 * abs(ORDER.index(p.answer) - ORDER.index(y))))
    return out


def constant(parsed, golds, labels):
    return [0.25] * len(parsed)


def too_few(parsed, golds, labels):
    return [1.0]


def not_finite(parsed, golds, labels):
    return [math.nan] * len(parsed)
'''


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_user_reward_replaces_the_built_in_one(rewards_file):
    fn = load_reward_fn(f"{rewards_file}:adjacent_credit")
    texts = [f"<think>x</think><answer>{a}</answer>" for a in ("joy", "fear", "anger", "bored")]
    rewards, parsed = batch_rewards(texts, ["joy"] * 4, LABELS, "grpo", reward_fn=fn)
    assert rewards.tolist() == [1.0, 0.5, 0.0, 0.0] and parsed[1].answer == "fear"


@pytest.mark.parametrize("name, message", [
    ("too_few", r"too_few returned 1 rewards for 2 completions"),
    ("not_finite", r"not_finite returned nan for completion 0"),
])
def test_bad_output_is_named(rewards_file, name, message):
    with pytest.raises(ValueError, match=message):
        batch_rewards(["a", "b"], ["joy", "joy"], LABELS, "grpo", reward_fn=load_reward_fn(f"{rewards_file}:{name}"))


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("math:no_such_function", "math has no function no_such_function"),
])
def test_bad_spec_is_refused_before_any_work(spec, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--reward-fn", spec])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_end_to_end(rewards_file, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    model, data = write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 12)
    train.main(["--model", str(model), "--data", str(data), "--mode", "grpo", "--max-steps", "2", "--batch-size", "2",
                "--group-size", "2", "--max-new-tokens", "6", "--no-progress", "--device", "cpu", "--output-dir",
                str(root / "out"), "--reward-fn", f"{rewards_file}:constant", "--eval-every", "0"])
    rows = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [0.25, 0.25] and all(math.isclose(r["reward_std"], 0) for r in rows)
    assert json.loads((root / "out" / "config.json").read_text())["loss"]["reward_fn"].endswith(":constant")
