"""Metrics against hand-computed numbers (and scikit-learn when it is installed)."""

import random
from fractions import Fraction as F

import pytest

from gtacore.metrics import classification_report, format_table, guess_answer_changes

LABELS = ["a", "b", "c"]
GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", None, "b"]
# Confusion (rows gold, columns a b c invalid):
#   a: 2 1 0 0
#   b: 0 1 0 1
#   c: 0 1 0 0
# a: TP 2, predicted 2, support 3 -> P = 1, R = 2/3, F1 = 2PR/(P+R) = (4/3)/(5/3) = 4/5
# b: TP 1, predicted 3, support 2 -> P = 1/3, R = 1/2, F1 = (1/3)/(5/6) = 2/5
# c: TP 0, predicted 0, support 1 -> P = R = F1 = 0
# accuracy = 3/6 = 1/2; macro F1 = (4/5 + 2/5 + 0)/3 = 2/5
# weighted F1 = (3*4/5 + 2*2/5 + 1*0)/6 = (16/5)/6 = 8/15


def test_hand_computed_with_invalid_prediction():
    r = classification_report(GOLD, PRED, LABELS)
    assert r["n"] == 6
    assert r["accuracy"] == pytest.approx(float(F(1, 2)))
    assert r["macro_f1"] == pytest.approx(float(F(2, 5)))
    assert r["weighted_f1"] == pytest.approx(float(F(8, 15)))
    assert r["invalid"] == 1 and r["invalid_rate"] == pytest.approx(1 / 6)
    a, b, c = (r["per_class"][x] for x in LABELS)
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1, 2 / 3, 4 / 5, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1 / 3, 1 / 2, 2 / 5, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0, 0, 0, 1)
    assert r["confusion"]["columns"] == ["a", "b", "c", "invalid"]
    assert r["confusion"]["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0]]


def test_out_of_set_prediction_counts_as_invalid_and_unused_label_lowers_macro():
    # "zzz" is not a label: same as None. Label "d" has no gold and no prediction:
    # F1 = 0, so macro F1 = (4/5 + 2/5 + 0 + 0)/4 = 3/10; weighted F1 is unchanged (support 0).
    r = classification_report(GOLD, [*PRED[:4], "zzz", PRED[5]], [*LABELS, "d"])
    assert r["macro_f1"] == pytest.approx(3 / 10)
    assert r["weighted_f1"] == pytest.approx(8 / 15)
    assert r["confusion"]["matrix"][1] == [0, 1, 0, 0, 1]
    assert r["per_class"]["d"]["support"] == 0


def test_perfect_and_all_wrong():
    gold = ["x", "y", "y", "z"]
    perfect = classification_report(gold, list(gold), ["x", "y", "z"])
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["weighted_f1"] == 1.0
    assert perfect["invalid"] == 0
    # Every prediction wrong (a rotation, plus one invalid): every TP is 0, so every F1 is 0.
    wrong = classification_report(gold, ["y", "z", None, "x"], ["x", "y", "z"])
    assert wrong["accuracy"] == wrong["macro_f1"] == wrong["weighted_f1"] == 0.0
    assert wrong["confusion"]["matrix"] == [[0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        classification_report(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="not in the label set"):
        classification_report(["a", "q"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="no examples"):
        classification_report([], [], ["a"])
    with pytest.raises(ValueError, match="duplicate"):
        classification_report(["a"], ["a"], ["a", "a"])


def test_against_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    labels = ["l0", "l1", "l2", "l3", "l4"]
    for _ in range(20):
        n = rng.randint(1, 60)
        gold = [rng.choice(labels[:4]) for _ in range(n)]  # l4 never gold: zero support
        pred = [rng.choice([*labels, None]) for _ in range(n)]
        r = classification_report(gold, pred, labels)
        # sklearn has no None: a placeholder outside labels= is never a positive of any class.
        sk_pred = ["__invalid__" if p is None else p for p in pred]
        kw = dict(labels=labels, zero_division=0)
        assert r["accuracy"] == pytest.approx(metrics.accuracy_score(gold, sk_pred))
        assert r["weighted_f1"] == pytest.approx(metrics.f1_score(gold, sk_pred, average="weighted", **kw))
        assert r["macro_f1"] == pytest.approx(metrics.f1_score(gold, sk_pred, average="macro", **kw))
        p, rec, f1, s = metrics.precision_recall_fscore_support(gold, sk_pred, **kw)
        got = [[r["per_class"][x][k] for x in labels] for k in ("precision", "recall", "f1", "support")]
        assert got == [pytest.approx(list(v)) for v in (p, rec, f1, s)]


def test_guess_answer_changes():
    gold = ["a", "a", "b", "b", "c", "c"]
    guess = ["a", "b", "b", None, "a", "a"]
    answer = ["a", "a", "c", "b", "b", "a"]
    # rows: right->right, wrong->right, right->wrong, wrong(None)->right, wrong->wrong (changed), wrong->wrong (same)
    r = guess_answer_changes(gold, guess, answer)
    assert (r["right_to_right"], r["wrong_to_right"], r["right_to_wrong"], r["wrong_to_wrong"]) == (1, 2, 1, 2)
    assert (r["unchanged"], r["changed"]) == (2, 4)
    assert r["wrong_to_right_rate"] == pytest.approx(2 / 6)
    assert r["changed_rate"] == pytest.approx(4 / 6)
    assert r["guess_accuracy"] == pytest.approx(2 / 6)
    assert r["answer_accuracy"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="lengths differ"):
        guess_answer_changes(gold, guess[:-1], answer)


def test_format_table():
    text = format_table(classification_report(GOLD, PRED, LABELS))
    lines = text.splitlines()
    assert lines[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["a", "1.0000", "0.6667", "0.8000", "3"]
    assert lines[2].split() == ["b", "0.3333", "0.5000", "0.4000", "2"]
    assert "weighted F1  0.5333" in text and "macro F1     0.4000" in text
    assert lines[-4].split() == ["gold", "\\", "pred", "a", "b", "c", "invalid"]
    assert lines[-2].split() == ["b", "0", "1", "0", "1"]
