"""A checkpoint's OOD detector: the card's `ood` block + its statistics file -> scores, abstain, UNK column.

    scorer = OodScorer.load("runs/toy/best", card, feature_dim=512)   # None when the card has no `ood`
    scores = scorer.score(features, logits)     # (N, D) | None, (N, K) raw logits -> (N,), higher = less familiar
    scorer.abstain(scores)                      # (N,) bool: score above the validation-chosen threshold
    scorer.unk(scores)                          # (N,) in [0, 1]: the ISIC UNK column (0.5 at the threshold)

The one place the Predictor and `dermaid evaluate` turn a card's detector into decisions; the statistics are
fitted by `dermaid calibrate` (dermaid.evaluation.calibrate), the detectors live in dermaid.evaluation.ood.
Detectors score raw logits (before the temperature), as calibrate fitted them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dermaid.classes import NUM_CLASSES
from dermaid.models.card import CheckpointError, ModelCard


@dataclass(frozen=True)
class OodScorer:
    """The card's chosen detector (and every other fitted one, for reports) with its threshold."""

    method: str
    threshold: float
    scale: float
    detectors: dict[str, Any]                  # method -> dermaid.evaluation.ood.OodDetector
    thresholds: dict[str, float]               # method -> its validation-chosen threshold

    @classmethod
    def load(cls, url: str, card: ModelCard, feature_dim: int | None) -> OodScorer | None:
        """The detector of the checkpoint at `url` (None when its card has no `ood` block).

        feature_dim: the width of the model's penultimate features (None: the model gives none, e.g. a
        compressed artifact; then only logit methods work). CheckpointError when the statistics are missing
        or do not match the model (naming both)."""
        from dermaid.evaluation.ood import FEATURE_METHODS, check_compatible, load_statistics

        block = card.ood
        if not block:
            return None
        detectors = load_statistics(url, str(block["statistics"]))
        method = str(block["method"])
        if method not in detectors:
            raise CheckpointError(f"{url}: the card's OOD method {method!r} has no statistics in "
                                  f"{block['statistics']} (it holds {sorted(detectors)}); rerun `dermaid calibrate`")
        if feature_dim is None:
            if method in FEATURE_METHODS:
                raise CheckpointError(f"{url}: OOD method {method!r} needs penultimate features, which a {card.kind} "
                                      f"artifact does not give; rerun `dermaid calibrate checkpoint={url}` (it fits "
                                      "the logit methods msp / energy for this kind)")
            detectors = {name: det for name, det in detectors.items() if name not in FEATURE_METHODS}
        check_compatible(detectors, NUM_CLASSES, feature_dim, f"{url}/{block['statistics']}")
        validation = block.get("validation") or {}
        thresholds = {name: float(validation[name]["threshold"]) for name in detectors if name in validation}
        thresholds[method] = float(block["threshold"])
        return cls(method=method, threshold=float(block["threshold"]), scale=float(block["scale"]),
                   detectors=detectors, thresholds=thresholds)

    @property
    def needs_features(self) -> bool:
        """Whether the chosen method scores penultimate features (else logits are enough)."""
        from dermaid.evaluation.ood import FEATURE_METHODS

        return self.method in FEATURE_METHODS

    def score(self, features: np.ndarray | None, logits: np.ndarray, method: str | None = None) -> np.ndarray:
        """features (N, D) | None, raw logits (N, K) -> OOD scores (N,) of `method` (default: the card's)."""
        detector = self.detectors[method or self.method]
        return np.asarray(detector.score(features, np.asarray(logits, dtype=np.float64)), dtype=np.float64)

    def abstain(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: refuse these images (score above the card's threshold)."""
        return np.asarray(scores) > self.threshold

    def unk(self, scores: np.ndarray) -> np.ndarray:
        """(N,) in [0, 1]: the UNK column (0.5 at the threshold), monotone in the score."""
        from dermaid.evaluation.ood import normalised_unk

        return normalised_unk(scores, self.threshold, scale=self.scale)  # (N,)
