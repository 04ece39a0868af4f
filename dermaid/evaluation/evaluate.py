"""Evaluate a checkpoint: predictions.csv in the ISIC submission format and metrics.json.

    dermaid evaluate checkpoint=runs/toy/best data.root=data/toy out=runs/toy/eval-val
    dermaid evaluate checkpoint=runs/toy/best data.root=data/toy split=test tta=8
    dermaid evaluate checkpoint=gs://bucket/runs/x/best data.root=gs://bucket/derm7pt split=all device=cuda

Plain PyTorch in this process (no Ray needed), on CPU or GPU. The probabilities are softmax(logits / T)
with the card's temperature, averaged over the test-time views when tta > 0; the same preprocessing
(`create_eval_transform(card.input)`) and `probabilities_from_logits` serve dermaid.inference.Predictor.
Outputs are decision support for research, never a diagnosis.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from dermaid.classes import CLASS_CODES, DISCLAIMER, SUBMISSION_CODES, UNKNOWN_CODE
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.evaluation.calibration import calibration_report
from dermaid.evaluation.metrics import compute_metrics, format_metrics_table, json_safe
from dermaid.files import join, write_text
from dermaid.models.card import ModelCard
from dermaid.training.loop import TTA_CHOICES, predict_logits, probabilities_from_logits, resolve_device

PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid evaluate checkpoint=PATH data.root=URL out=DIR [split=val|test|all] [tta=8]`."""
    result = evaluate(cfg)
    metrics = result["metrics"]
    print(f"{result['num_images']} images ({result['split']}) -> {result['out']}/{PREDICTIONS_FILE}")
    if metrics.get("per_class"):
        print(format_metrics_table(metrics))
    print(DISCLAIMER)
    return result


def evaluate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Predict a split of a dataset with a checkpoint; write predictions.csv and metrics.json to `out`."""
    from dermaid.data.loading import load_records
    from dermaid.data.prepare import ensure_prepared
    from dermaid.models.card import load_float_model

    plain = to_plain(cfg)
    checkpoint = plain["checkpoint"]
    if not checkpoint:
        raise DermaidError("checkpoint= is required: a checkpoint directory written by `dermaid train` (DIR/best)")
    split = str(plain["split"])
    if split not in ("val", "test", "all"):
        raise DermaidError(f"split={split!r}: expected val, test or all")
    tta = int(plain["tta"])
    if tta not in TTA_CHOICES:
        raise DermaidError(f"tta={tta}: expected one of {list(TTA_CHOICES)}")
    device = resolve_device(str(plain["device"]))
    out = str(plain["out"])

    model, card = load_float_model(str(checkpoint), device)  # CheckpointError: missing, unreadable, misfit
    version_url = ensure_prepared(plain["data"])
    records = load_records(version_url, split=split, fold=int(plain["data"]["fold"]))
    if records.empty:
        raise DermaidError(f"{version_url}: split {split!r} has no images")
    _check_labels(records, card, version_url)

    temperature = card.temperature if plain["calibrated"] else 1.0
    probs, logits = predict_records(model, records, card.input, temperature, tta, device,
                                    batch_size=int(plain["batch_size"]))
    write_text(join(out, PREDICTIONS_FILE), submission_csv(records["image_id"].tolist(), probs))

    labeled = records["label_idx"].to_numpy() >= 0
    metrics: dict[str, Any] = {"balanced_accuracy": None, "num_images": int(len(records)),
                               "num_labeled": int(labeled.sum())}
    if labeled.any():
        labels = records["label_idx"].to_numpy()[labeled]
        metrics.update(compute_metrics(labels, probs[labeled]))
        metrics["calibration"] = calibration_report(logits[labeled], labels, temperature=temperature)
    metrics.update({
        "checkpoint": str(checkpoint), "model": card.model_name, "split": split, "tta": tta,
        "temperature": temperature, "dataset_version": version_url.rstrip("/").rsplit("/", 1)[-1],
        "trained_on": card.dataset_versions, "disclaimer": DISCLAIMER,
    })
    write_text(join(out, METRICS_FILE), json.dumps(json_safe(metrics), indent=2))
    return {"out": out, "split": split, "num_images": int(len(records)), "metrics": metrics}


def predict_records(model: torch.nn.Module, records: pd.DataFrame, input_spec: dict[str, Any], temperature: float,
                    tta: int, device: torch.device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Records -> (calibrated probabilities (N, K), identity-view logits (N, K)) via the one predict path."""
    from dermaid.data.torch_dataset import create_eval_loader

    loader = create_eval_loader(records, input_spec, batch_size=batch_size)
    logits, _ = predict_logits(model, loader, device, tta=tta)  # (N, V, K)
    return probabilities_from_logits(logits, temperature), logits[:, 0].double().numpy()


def submission_csv(image_ids: list[str], probs: np.ndarray) -> str:
    """The ISIC submission format: image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (UNK = 0.0 from our models)."""
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(CLASS_CODES))
    frame[UNKNOWN_CODE] = 0.0
    frame.insert(0, "image", image_ids)
    buf = io.StringIO()
    frame[["image", *SUBMISSION_CODES]].to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def _check_labels(records: pd.DataFrame, card: ModelCard, version_url: str) -> None:
    """Every label in the data must be a class the model predicts."""
    known = set(card.class_codes)
    labels = records["label"].dropna()
    unknown = sorted(set(labels) - known)
    if unknown:
        count = int(labels.isin(unknown).sum())
        raise DermaidError(f"{version_url}: {count} image(s) labelled {unknown}, a class the model does not "
                           f"know (its classes: {sorted(known)})")
