"""ISIC 2019 classification metrics: the one definition used by training, evaluation and notebooks.

Every number here equals what the official `isic-challenge-scoring` package computes on the same
predictions (tests/test_metrics.py checks it):
  * balanced_accuracy: mean over the classes present in the truth of TP / support, where the
    prediction is the arg-max class and a tie for the maximum counts as "undecided" (wrong);
  * per class (one-vs-rest): sensitivity and specificity at probability > 0.5 (1.0 when undefined,
    as the official scorer does), ROC AUC (NaN when the class is absent) and average precision;
  * auc_macro / ap_macro: the mean over classes, skipping NaN (pandas' mean, as the scorer does).
The confusion matrix counts arg-max predictions (rows: truth, columns: predicted); undecided
predictions are left out of it, as they are in the scorer's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import sklearn.metrics

from dermaid.classes import CLASS_CODES

UNDECIDED = -1


def predicted_labels(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) arg-max class index; UNDECIDED (-1) where the maximum is tied."""
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.max(axis=1, keepdims=True)  # (N, 1)
    ties = (probs == top).sum(axis=1) > 1  # (N,)
    labels = probs.argmax(axis=1)
    labels[ties] = UNDECIDED
    return labels


def confusion_matrix(labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """(K, K) counts of arg-max predictions; rows are the true class, columns the predicted one."""
    labels = np.asarray(labels, dtype=np.int64)
    k = num_classes or np.asarray(probs).shape[1]
    pred = predicted_labels(probs)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    cm = np.zeros((k, k), dtype=np.float64)
    decided = pred != UNDECIDED
    np.add.at(cm, (labels[decided], pred[decided]), w[decided])
    return cm


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The ISIC 2019 official metric: mean per-class recall of the arg-max prediction."""
    labels = np.asarray(labels, dtype=np.int64)
    k = np.asarray(probs).shape[1]
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    cm = confusion_matrix(labels, probs, k, w)
    support = np.bincount(labels, weights=w, minlength=k)  # (K,) includes undecided rows
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _binary_counts(truth: np.ndarray, pred: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float]:
    tp = float(np.sum(w * (truth & pred)))
    tn = float(np.sum(w * (~truth & ~pred)))
    fp = float(np.sum(w * (~truth & pred)))
    fn = float(np.sum(w * (truth & ~pred)))
    return tp, tn, fp, fn


def _auc(truth: np.ndarray, score: np.ndarray, w: np.ndarray | None) -> float:
    if truth.all() or not truth.any():
        return float("nan")  # undefined with one class present (sklearn warns and returns NaN)
    return float(sklearn.metrics.roc_auc_score(truth, score, sample_weight=w))


def _ap(truth: np.ndarray, score: np.ndarray, w: np.ndarray | None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no positive class": sklearn returns 0.0, as the scorer reports
        return float(sklearn.metrics.average_precision_score(truth, score, sample_weight=w))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def compute_metrics(labels: np.ndarray, probs: np.ndarray, codes: Sequence[str] = CLASS_CODES,
                    weights: np.ndarray | None = None) -> dict[str, Any]:
    """Truth (N,) class indices and probabilities (N, K) -> the ISIC metric table.

    Returns {"num_samples", "balanced_accuracy", "accuracy", "auc_macro", "ap_macro",
    "sensitivity_macro", "specificity_macro", "per_class": {code: {support, sensitivity,
    specificity, auc, ap}}, "confusion_matrix": [[...]] (rows truth, columns predicted), "classes"}.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] != len(codes):
        raise ValueError(f"probabilities {probs.shape} do not fit labels {labels.shape} and {len(codes)} classes")
    if labels.size and (labels.min() < 0 or labels.max() >= len(codes)):
        raise ValueError(f"labels must be class indices in 0..{len(codes) - 1}")
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    sk_w = None if weights is None else w
    cm = confusion_matrix(labels, probs, len(codes), w)
    pred = predicted_labels(probs)
    per_class: dict[str, dict[str, float]] = {}
    for k, code in enumerate(codes):
        truth = labels == k  # (N,)
        tp, tn, fp, fn = _binary_counts(truth, probs[:, k] > 0.5, w)
        per_class[code] = {
            "support": float(np.sum(w[truth])),
            "sensitivity": tp / (tp + fn) if tp + fn else 1.0,
            "specificity": tn / (tn + fp) if tn + fp else 1.0,
            "auc": _auc(truth, probs[:, k], sk_w),
            "ap": _ap(truth, probs[:, k], sk_w),
        }
    return {
        "num_samples": int(len(labels)),
        "balanced_accuracy": balanced_accuracy(labels, probs, w),
        "accuracy": float(np.sum(w * (pred == labels)) / np.sum(w)) if len(labels) else float("nan"),
        "auc_macro": _nanmean([m["auc"] for m in per_class.values()]),
        "ap_macro": _nanmean([m["ap"] for m in per_class.values()]),
        "sensitivity_macro": _nanmean([m["sensitivity"] for m in per_class.values()]),
        "specificity_macro": _nanmean([m["specificity"] for m in per_class.values()]),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int if weights is None else float).tolist(),
        "classes": list(codes),
    }


def bootstrap_interval(labels: np.ndarray, probs: np.ndarray, statistic=None, confidence: float = 0.95,
                       n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric over images (default: balanced_accuracy), resampling
    (label, probabilities) pairs with replacement: scipy.stats.bootstrap. Percentile rather than scipy's default
    BCa: BCa's jackknife costs one metric call per image (25k for ISIC 2019); 1000 resamples of a 25k-image set
    take a few seconds. (nan, nan) for fewer than 2 images."""
    import scipy.stats

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    statistic = statistic or balanced_accuracy
    if len(labels) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate resample (one class only) is still a valid draw
        result = scipy.stats.bootstrap((np.arange(len(labels)),), lambda idx: statistic(labels[idx], probs[idx]),
                                       n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                                       vectorized=False, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def flatten_metrics(metrics: dict[str, Any], split: str, per_class: Sequence[str] = ("sensitivity", "auc")) -> dict[str, float]:
    """The scalar metrics as `split/metric` (and `split/metric/CODE` for the per-class ones named)."""
    flat = {f"{split}/{key}": float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and key != "num_samples"}
    for code, row in metrics.get("per_class", {}).items():
        for key in per_class:
            flat[f"{split}/{key}/{code}"] = float(row[key])
    return flat


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """A plain-text per-class table (for consoles, the demo and reports)."""
    lines = [f"{'class':<6} {'support':>7} {'sens':>6} {'spec':>6} {'auc':>6} {'ap':>6}"]
    for code, row in metrics["per_class"].items():
        lines.append(f"{code:<6} {row['support']:>7.0f} {row['sensitivity']:>6.3f} {row['specificity']:>6.3f} "
                     f"{row['auc']:>6.3f} {row['ap']:>6.3f}")
    lines.append(f"balanced accuracy {metrics['balanced_accuracy']:.3f}   macro AUC {metrics['auc_macro']:.3f}   "
                 f"n={metrics['num_samples']}")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively (metrics.json must be strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
