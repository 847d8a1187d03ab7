"""Label collapse is visible while it happens: label shares, entropy and majority share per step
and per evaluation, a warning naming the label, per-class recall in the summary."""

import json
import math

import pytest
import torch

import train
from gtacore.completions import parse_completion
from gtacore.distributed import DistInfo
from gtacore.metrics import CollapseWatch, StepMetrics, label_counts, label_distribution, majority
from train_fixtures import LABELS, write_dataset, write_tiny_checkpoint

ONE_RANK = DistInfo()


def entropy(probs):
    return torch.distributions.Categorical(probs=torch.tensor(probs, dtype=torch.float64)).entropy().item()


def test_label_distribution_of_known_counts():
    out = label_distribution("answer", {"joy": 6, "anger": 2, "fear": 0})
    assert out["answer_share/joy"] == 6 / 8 and out["answer_share/anger"] == 2 / 8 and out["answer_share/fear"] == 0
    assert out["answer_label_entropy"] == pytest.approx(entropy([6 / 8, 2 / 8, 0]))
    assert out["majority_label_share"] == 6 / 8
    one = label_distribution("guess", {"joy": 5, "anger": 0, "fear": 0})
    assert one["guess_label_entropy"] == 0 and one["majority_guess_share"] == 1
    even = label_distribution("answer", dict.fromkeys(LABELS, 4))
    assert even["answer_label_entropy"] == pytest.approx(math.log(len(LABELS)))
    none = label_distribution("answer", dict.fromkeys(LABELS, 0))  # nothing parsed: no distribution
    assert "answer_label_entropy" not in none and "majority_label_share" not in none
    assert label_counts(["joy", None, "joy", "bored", "fear"], LABELS) == {"joy": 2, "anger": 0, "fear": 1}


def test_step_metrics_of_known_rollouts():
    texts = ["<guess>joy</guess><think>x</think><answer>joy</answer>"] * 3 + \
            ["<guess>fear</guess><think>x</think><answer>joy</answer>", "no format at all"]
    golds = ["joy", "joy", "anger", "fear", "fear"]
    parsed = [parse_completion(t, LABELS, "gta") for t in texts]
    m = StepMetrics()
    m.labels(parsed, golds, LABELS, "gta")
    out = m.reduce(ONE_RANK)
    assert out["answer_share/joy"] == 1.0 and out["majority_label_share"] == 1.0 and out["answer_label_entropy"] == 0
    assert out["guess_share/joy"] == 3 / 4 and out["guess_share/fear"] == 1 / 4
    assert out["guess_label_entropy"] == pytest.approx(entropy([3 / 4, 0, 1 / 4]))
    assert out["gold_share/fear"] == 2 / 5 and out["gold_label_entropy"] == pytest.approx(entropy([2 / 5, 1 / 5, 2 / 5]))
    assert not any("_count/" in k for k in out)


def test_collapse_watch_names_the_label_after_enough_steps_in_a_row():
    def step(label, share):
        rest = (1 - share) / 2
        return {f"answer_share/{c}": share if c == label else rest for c in LABELS} | {f"gold_share/{label}": 1 / 3}

    watch = CollapseWatch(share=0.8, steps=3)
    seen = [watch.update(step(*s)) for s in [("joy", 0.9), ("joy", 0.95), ("fear", 0.9), ("fear", 0.9), ("fear", 1.0)]]
    assert seen[:4] == [None] * 4  # the label changed at step 3: the count restarts
    assert "'fear'" in seen[4] and "3 steps in a row" in seen[4] and "33%" in seen[4]
    assert watch.update(step("fear", 0.5)) is None  # below the share: over
    assert CollapseWatch(0.8, 0).update(step("joy", 1.0)) is None  # 0 steps: never warn
    assert majority({"step": 1}) == (None, 0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("collapse")
    return write_tiny_checkpoint(root / "model"), write_dataset(root / "train.jsonl", 24), write_dataset(root / "test.jsonl", 6, seed=1)


def test_a_collapsing_run_logs_it_and_warns(setup, tmp_path, monkeypatch, capsys):
    """Every rollout answers 'joy' (the texts are replaced after sampling): the step metrics say
    so, the warning names the label, and the evaluation logs shares and per-class recall."""
    real = train.rollout

    def collapsed(*args, **kwargs):
        ro = real(*args, **kwargs)
        ro.texts = ["<guess>joy</guess><think>it is</think><answer>joy</answer>"] * len(ro.texts)
        return ro

    monkeypatch.setattr(train, "rollout", collapsed)
    model, data, test = setup
    train.main(["--model", str(model), "--data", str(data), "--eval-data", str(test), "--max-steps", "3",
                "--output-dir", str(tmp_path), "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "8",
                "--no-progress", "--device", "cpu", "--collapse-steps", "2"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["answer_share/joy"] == 1.0 and r["majority_label_share"] == 1.0 and r["answer_label_entropy"] == 0
        assert sum(r[f"gold_share/{c}"] for c in LABELS) == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert out.count("label collapse? 'joy'") == 2  # steps 2 and 3
    assert "recall per class" in out and "majority share" in out
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    for e in evals:  # the untouched random model: its answers rarely parse, so the entropy may be absent
        assert {f"recall/{c}" for c in LABELS} | {f"answer_share/{c}" for c in LABELS} <= set(e)
        assert ("answer_label_entropy" in e) == any(e[f"answer_share/{c}"] > 0 for c in LABELS)
        assert {f"guess_share/{c}" for c in LABELS} <= set(e)


def _probe_reference(model, tok, prompts, labels, mode):
    """Each prompt's score of each label [P, L], from full forwards of prompt + target, one at a time."""
    from gtacore.completions import format_target
    from gtacore.prompts import sft_target_ids

    table = []
    for p in prompts:
        scores = []
        for label in labels:
            if mode == "grpo":
                ids = tok.encode(format_target(label, mode))
                mask = [True] * len(ids)
            else:
                ids, mask = sft_target_ids(tok, p.text, label, mode)
            seq = torch.tensor([p.ids + ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq)[0].double(), -1)  # [T, V]
            at = [len(p.ids) + j - 1 for j in range(len(ids))]  # position predicting target token j
            scores.append(sum(logp[a, t].item() for a, t, m in zip(at, ids, mask) if m))
        table.append(scores)
    return torch.tensor(table, dtype=torch.float64)


@pytest.mark.parametrize("mode, shared", [("gta", True), ("gta", False), ("sft", True), ("grpo", True)])
def test_probe_picks_each_prompts_best_scoring_label(setup, mode, shared):
    from gtacore import models
    from gtacore.data import Example
    from gtacore.models.tokenizer import Tokenizer
    from gtacore.probe import make_probe, probe_scores, probe_shares
    from gtacore.prompts import make_prompts

    model_dir, _, _ = setup
    model, tok = models.load_pretrained(model_dir), Tokenizer(model_dir)
    with torch.no_grad():  # a policy with real preferences: an untrained model prefers one label everywhere
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight, generator=torch.Generator().manual_seed(3)))
    examples = [Example(f"I feel {w} about item {i}.", "joy", f"x:{i}") for i, w in enumerate(["glad", "mad", "scared",
                                                                                              "nervous", "great"])]
    prompts = make_prompts(tok, examples, LABELS, mode, [], 1024)
    probe = make_probe(tok, prompts, LABELS, mode, shared, "cpu")
    want = _probe_reference(model, tok, prompts, LABELS, mode)
    torch.testing.assert_close(probe_scores(model, probe).double(), want, rtol=1e-5, atol=1e-4)
    got, best = probe_shares(model, probe), want.argmax(dim=1).tolist()
    for k, label in enumerate(LABELS):
        assert got[f"probe_share/{label}"].item() == pytest.approx(best.count(k) / len(prompts))
    assert got["probe_majority_share"].item() == pytest.approx(max(best.count(k) for k in range(3)) / len(prompts))


def test_collapse_watch_keeps_the_latest_probe_between_probes():
    watch = CollapseWatch(share=0.8, steps=2)
    varied = {f"answer_share/{c}": 1 / 3 for c in LABELS}
    probed = varied | {f"probe_share/{c}": (0.9 if c == "fear" else 0.05) for c in LABELS}
    assert watch.update(probed) is None
    warning = watch.update(varied)  # no probe this step: the last one stands
    assert "'fear'" in warning and "greedy probe's answers" in warning and "2 steps in a row" in warning


def test_the_probe_runs_every_n_steps_and_is_timed(setup, tmp_path):
    model, data, _ = setup
    train.main(["--model", str(model), "--data", str(data), "--max-steps", "3", "--output-dir", str(tmp_path),
                "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6", "--no-progress", "--device", "cpu",
                "--probe-every", "2", "--probe-prompts", "5"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probed = [r["step"] for r in rows if "probe_majority_share" in r]
    assert probed == [1, 3]  # the policy entering steps 1 and 3
    for r in rows:
        shares = [r.get(f"probe_share/{c}") for c in LABELS]
        if r["step"] in probed:
            assert sum(shares) == pytest.approx(1.0) and r["time_probe"] > 0
            assert r["probe_majority_share"] == pytest.approx(max(shares))
        else:
            assert shares == [None] * 3 and r["time_probe"] == 0
