"""dermaid.evaluation.metrics equals the official isic-challenge-scoring package; calibration works."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from dermaid.classes import CLASS_CODES, NUM_CLASSES, SUBMISSION_CODES
from dermaid.evaluation.calibration import (
    calibration_report, expected_calibration_error, fit_temperature, negative_log_likelihood, softmax_with_temperature,
)
from dermaid.evaluation.metrics import UNDECIDED, compute_metrics, flatten_metrics, json_safe, predicted_labels
from dermaid.evaluation.evaluate import submission_csv


def official_score(labels: np.ndarray, probs: np.ndarray, codes=CLASS_CODES) -> ClassificationScore:
    """Score with the official package, straight from DataFrames (the scorer's own types)."""
    index = [f"ISIC_{i:07d}" for i in range(len(labels))]
    truth = pd.DataFrame(np.eye(len(codes))[labels], index=index, columns=list(codes))
    pred = pd.DataFrame(probs, index=index, columns=list(codes))
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=index)
    return ClassificationScore(truth, pred, weights, ClassificationMetric.BALANCED_ACCURACY)


def assert_matches_official(ours: dict, official: ClassificationScore, codes=CLASS_CODES) -> None:
    assert ours["balanced_accuracy"] == pytest.approx(official.aggregate["balanced_accuracy"], abs=1e-12)
    for code in codes:
        row = official.per_category.loc[code]
        for key in ("sensitivity", "specificity", "auc", "ap"):
            theirs = float(row[key])
            if np.isnan(theirs):
                assert np.isnan(ours["per_class"][code][key]), (code, key)
            else:
                assert ours["per_class"][code][key] == pytest.approx(theirs, abs=1e-12), (code, key)
    assert ours["auc_macro"] == pytest.approx(official.macro_average["auc"], abs=1e-12)
    assert ours["ap_macro"] == pytest.approx(official.macro_average["ap"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_official_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.choice(NUM_CLASSES, size=n, p=[0.2, 0.4, 0.12, 0.05, 0.1, 0.04, 0.04, 0.05])
    probs = rng.dirichlet(np.ones(NUM_CLASSES) * 0.7, size=n)  # (N, K)
    ours = compute_metrics(labels, probs)
    assert_matches_official(ours, official_score(labels, probs))
    assert 0.0 <= ours["balanced_accuracy"] <= 0.35  # random guessing sits near 1/8


def test_metrics_equal_official_on_realistic_predictions_with_ties():
    rng = np.random.default_rng(7)
    n = 200
    labels = np.concatenate([np.arange(NUM_CLASSES), rng.choice(NUM_CLASSES, size=n - NUM_CLASSES)])
    logits = rng.normal(size=(n, NUM_CLASSES)) + 3.0 * np.eye(NUM_CLASSES)[labels] * (rng.random(n) < 0.8)[:, None]
    probs = softmax_with_temperature(logits)
    probs[:5] = 1.0 / NUM_CLASSES  # five exact ties: "undecided", wrong for both implementations
    ours = compute_metrics(labels, probs)
    assert_matches_official(ours, official_score(labels, probs))
    assert (predicted_labels(probs)[:5] == UNDECIDED).all()
    assert ours["balanced_accuracy"] > 0.6  # a good model is visibly better than chance
    cm = np.asarray(ours["confusion_matrix"])
    assert cm.shape == (NUM_CLASSES, NUM_CLASSES) and cm.sum() == n - 5


def test_absent_class_is_skipped_like_the_official_balanced_accuracy():
    # The official ClassificationScore crashes on a class with no positives (its partial-AUC step),
    # so compare the pieces it does define: its balanced accuracy function skips the absent class.
    from isic_challenge_scoring.metrics import balanced_multiclass_accuracy

    rng = np.random.default_rng(11)
    labels = rng.choice([0, 1, 2, 3, 4, 5, 7], size=150)  # no VASC
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=150)
    ours = compute_metrics(labels, probs)
    truth = pd.DataFrame(np.eye(NUM_CLASSES)[labels], columns=list(CLASS_CODES))
    theirs = balanced_multiclass_accuracy(truth, pd.DataFrame(probs, columns=list(CLASS_CODES)),
                                          pd.Series(np.ones(150)))
    assert ours["balanced_accuracy"] == pytest.approx(theirs, abs=1e-12)
    assert np.isnan(ours["per_class"]["VASC"]["auc"]) and not np.isnan(ours["auc_macro"])


def test_perfect_predictions_score_one():
    labels = np.arange(NUM_CLASSES).repeat(3)
    probs = np.eye(NUM_CLASSES)[labels] * 0.9 + 0.1 / NUM_CLASSES
    ours = compute_metrics(labels, probs)
    assert ours["balanced_accuracy"] == pytest.approx(1.0)
    assert ours["auc_macro"] == pytest.approx(1.0)
    flat = flatten_metrics(ours, "val")
    assert flat["val/balanced_accuracy"] == pytest.approx(1.0) and "val/sensitivity/MEL" in flat


def test_submission_csv_is_scored_by_the_official_scorer():
    # Like the official ISIC 2019 test set, the truth holds an UNK image (the scorer cannot score a
    # category without positives); our models give UNK = 0.0, so that image counts as a miss.
    rng = np.random.default_rng(3)
    n = 60
    labels = np.concatenate([np.arange(NUM_CLASSES), rng.choice(NUM_CLASSES, size=n - NUM_CLASSES - 1), [NUM_CLASSES]])
    probs = rng.dirichlet(np.ones(NUM_CLASSES), size=n)  # (N, 8)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    truth = pd.DataFrame(np.eye(len(SUBMISSION_CODES))[labels], columns=list(SUBMISSION_CODES))
    truth.insert(0, "image", ids)
    csv_text = submission_csv(ids, probs)
    assert csv_text.splitlines()[0] == "image," + ",".join(SUBMISSION_CODES)
    score = ClassificationScore.from_stream(io.StringIO(truth.to_csv(index=False)), io.StringIO(csv_text),
                                            ClassificationMetric.BALANCED_ACCURACY)
    probs9 = np.concatenate([probs, np.zeros((n, 1))], axis=1)  # (N, 9) as written
    ours = compute_metrics(labels, probs9, codes=SUBMISSION_CODES)
    assert score.overall == pytest.approx(ours["balanced_accuracy"], abs=1e-12)
    assert_matches_official(ours, score, codes=SUBMISSION_CODES)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        compute_metrics(np.zeros(3, dtype=int), np.zeros((4, NUM_CLASSES)))
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics(np.array([0, 9]), np.full((2, NUM_CLASSES), 0.125))


def test_json_safe_replaces_nan():
    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float64(2.0)}) == {"a": None, "b": [1.0, None], "c": 2.0}


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    rng = np.random.default_rng(0)
    n = 2000
    clean = 1.5 * rng.normal(size=(n, NUM_CLASSES))  # (N, K) calibrated by construction:
    probs = softmax_with_temperature(clean)
    labels = np.array([rng.choice(NUM_CLASSES, p=p) for p in probs])  # labels drawn from softmax(clean)
    logits = 4.0 * clean  # four times too confident
    t = fit_temperature(logits, labels)
    assert 2.5 < t < 6.0
    report = calibration_report(logits, labels)
    assert report["nll_calibrated"] < report["nll"] - 0.2
    assert report["ece_calibrated"] < report["ece"]
    assert negative_log_likelihood(logits, labels, t) == pytest.approx(report["nll_calibrated"])
    # calibrated logits are left alone
    assert fit_temperature(clean, labels) == pytest.approx(1.0, abs=0.25)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 1, 0])) == pytest.approx(1.0)
