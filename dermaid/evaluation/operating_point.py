"""The triage operating point: the "see a doctor soon" cut-off on the calibrated malignancy score
(the summed probability of the malignant classes), chosen on the validation fold for a target sensitivity.

    op = choose_triage_cutoff(val_malignancy, val_is_malignant, target_sensitivity=0.95)  # stored in the card
    test_op = apply_cutoff(test_malignancy, test_is_malignant, op["cutoff"])              # reported by evaluate

An image is flagged when malignancy >= cutoff. The chosen cut-off is the largest one whose sensitivity on
the given images reaches the target: any higher cut-off misses one more malignant lesion than allowed.
This is decision support for a clinician, never a diagnosis.
"""

from __future__ import annotations

import math

import numpy as np

from dermaid.errors import DermaidError


def _inputs(malignancy, is_malignant) -> tuple[np.ndarray, np.ndarray]:
    score = np.asarray(malignancy, dtype=np.float64)  # (N,)
    truth = np.asarray(is_malignant, dtype=bool)  # (N,)
    if score.shape != truth.shape or score.ndim != 1:
        raise DermaidError(f"triage: malignancy {score.shape} and is_malignant {truth.shape} must be equal-length 1-d")
    return score, truth


def apply_cutoff(malignancy, is_malignant, cutoff: float) -> dict[str, float | int]:
    """Sensitivity, specificity and the four counts when malignancy >= cutoff is flagged (NaN for an empty side)."""
    score, truth = _inputs(malignancy, is_malignant)
    flagged = score >= cutoff  # (N,)
    tp, fn = int((flagged & truth).sum()), int((~flagged & truth).sum())
    tn, fp = int((~flagged & ~truth).sum()), int((flagged & ~truth).sum())
    return {
        "cutoff": float(cutoff),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def choose_triage_cutoff(malignancy, is_malignant, target_sensitivity: float) -> dict[str, float | int]:
    """The largest cut-off whose sensitivity on these images is >= target_sensitivity, with its operating point."""
    score, truth = _inputs(malignancy, is_malignant)
    if not 0.0 < target_sensitivity <= 1.0:
        raise DermaidError(f"triage: target_sensitivity must be in (0, 1], got {target_sensitivity}")
    malignant = np.sort(score[truth])[::-1]  # (P,) descending
    if len(malignant) == 0:
        raise DermaidError("triage: no malignant images to choose a cut-off from; use a larger validation fold")
    needed = max(1, math.ceil(target_sensitivity * len(malignant) - 1e-9))  # malignant images that must be flagged
    cutoff = float(malignant[needed - 1])
    return {"cutoff": cutoff, "target_sensitivity": float(target_sensitivity),
            **{k: v for k, v in apply_cutoff(score, truth, cutoff).items() if k != "cutoff"}}
