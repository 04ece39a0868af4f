"""Calibration: temperature scaling fitted on the validation fold, ECE and NLL before and after.

    T = fit_temperature(val_logits, val_labels)       # LBFGS on the NLL of softmax(logits / T)
    probs = softmax_with_temperature(logits, T)       # what evaluation and Serve report

The temperature is stored in the model card (`card.calibration["temperature"]`, read as `card.temperature`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE_RANGE = (0.05, 20.0)  # a fitted T outside this means the fit (or the model) is broken


def _as_tensors(logits, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, K)
    y = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    return z, y


def softmax_with_temperature(logits, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K) calibrated probabilities."""
    z, _ = _as_tensors(logits)
    return torch.softmax(z / float(temperature), dim=-1).numpy()


def negative_log_likelihood(logits, labels, temperature: float = 1.0) -> float:
    """Mean NLL (cross-entropy) of softmax(logits / T)."""
    z, y = _as_tensors(logits, labels)
    return float(F.cross_entropy(z / float(temperature), y))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)  # (N,)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the validation NLL of softmax(logits / T).

    Optimises log T with LBFGS (T stays positive); returns 1.0 for an empty set.
    """
    z, y = _as_tensors(logits, labels)
    if len(y) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not np.isfinite(temperature):
        return 1.0
    return float(np.clip(temperature, *TEMPERATURE_RANGE))


def calibration_report(logits, labels, temperature: float | None = None) -> dict[str, float]:
    """Fit (unless given) the temperature and report NLL and ECE before and after scaling."""
    t = fit_temperature(logits, labels) if temperature is None else float(temperature)
    return {
        "temperature": t,
        "nll": negative_log_likelihood(logits, labels),
        "ece": expected_calibration_error(softmax_with_temperature(logits), labels),
        "nll_calibrated": negative_log_likelihood(logits, labels, t),
        "ece_calibrated": expected_calibration_error(softmax_with_temperature(logits, t), labels),
    }
