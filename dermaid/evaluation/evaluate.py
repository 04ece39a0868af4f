"""Evaluate a checkpoint: predictions.csv in the ISIC submission format and metrics.json.

    dermaid evaluate checkpoint=runs/toy/best data.root=data/toy out=runs/toy/eval-val
    dermaid evaluate checkpoint=runs/toy/best data.root=data/toy split=test tta=8
    dermaid evaluate checkpoint=gs://bucket/runs/x/best data.root=gs://bucket/derm7pt split=all device=cuda
    dermaid evaluate checkpoint=runs/toy/best experiment=toy split=test ood=data/toy-ood   # + OOD detection metrics
    dermaid evaluate checkpoint=runs/toy/best-int8-static experiment=toy split=test          # any artifact kind

Every artifact kind dermaid.inference.Predictor loads is evaluated (dermaid.inference.loaders: float weights, int8
and float ONNX, TorchScript): the same model callable, the same preprocessing, so the scores are the Predictor's.
A compressed artifact gives no penultimate features (only logit-based OOD methods) and runs at its exported input
size: tta=8's rotations are refused for a non-square one, with the reason (loaders.tta_refusal).

Plain PyTorch in this process (no Ray needed), on CPU or GPU. The probabilities are softmax(logits / T)
with the card's temperature, averaged over the test-time views when tta > 0; the same preprocessing
(`create_eval_transform(card.input)`) and `probabilities_from_logits` serve dermaid.inference.Predictor.
When the card has an `ood` block (`dermaid calibrate`), the UNK column of predictions.csv is the detector's
normalised score (dermaid.evaluation.ood.normalised_unk; 0.0 without a detector) and metrics.json gains `ood`
(method, threshold, refused share of these images) and `triage` (the card's cut-off applied to these images);
`ood=URL` (a set from `dermaid synth kind=ood`) adds AUROC, FPR at 95% TPR and refused shares per method and kind.
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
from dermaid.inference.loaders import ModelFn
from dermaid.inference.ood_scorer import OodScorer
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
    from dermaid.inference.loaders import create_model_fn, tta_refusal
    from dermaid.models.card import load_card

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

    card = load_card(str(checkpoint))  # CheckpointError: missing, unreadable, unknown format
    refusal = tta_refusal(card, tta)
    if refusal:
        raise DermaidError(f"{checkpoint}: {refusal}")
    model = create_model_fn(str(checkpoint), card, device)  # any artifact kind; CheckpointError: unreadable, misfit
    version_url = ensure_prepared(plain["data"])
    records = load_records(version_url, split=split, fold=int(plain["data"]["fold"]))
    if records.empty:
        raise DermaidError(f"{version_url}: split {split!r} has no images")
    _check_labels(records, card, version_url)

    temperature = card.temperature if plain["calibrated"] else 1.0
    batch_size = int(plain["batch_size"])
    features, logits, probs = predict_records_with_features(model, records, card.input, temperature, tta, device,
                                                            batch_size=batch_size)
    ood = OodScorer.load(str(checkpoint), card, _feature_dim(model))  # None without `dermaid calibrate`
    scores = ood.score(features, logits) if ood else None  # (N,)
    unk = ood.unk(scores) if ood else None
    write_text(join(out, PREDICTIONS_FILE), submission_csv(records["image_id"].tolist(), probs, unk))

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
    if ood is not None:
        metrics["ood"] = {"method": ood.method, "threshold": ood.threshold,
                          "refused_in": float(ood.abstain(scores).mean())}
        if plain["ood"]:
            ood_images = _read_ood_records(str(plain["ood"]))
            outside = predict_records_with_features(model, ood_images, card.input, temperature, 0, device,
                                                    batch_size=batch_size)[:2]  # features, logits
            metrics["ood"]["ood_set"] = {"url": str(plain["ood"]), **ood_set_metrics(
                ood, (features, logits), outside, [row["kind"] for row in ood_images])}
    if card.triage and labeled.any():
        metrics["triage"] = triage_report(card.triage, probs[labeled], records["label_idx"].to_numpy()[labeled])
    write_text(join(out, METRICS_FILE), json.dumps(json_safe(metrics), indent=2))
    return {"out": out, "split": split, "num_images": int(len(records)), "metrics": metrics}


def predict_records(model: ModelFn, records: pd.DataFrame, input_spec: dict[str, Any], temperature: float,
                    tta: int, device: torch.device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Records -> (calibrated probabilities (N, K), identity-view logits (N, K)) via the one predict path; model:
    any artifact kind's model callable (dermaid.inference.loaders.create_model_fn)."""
    from dermaid.data.torch_dataset import create_eval_loader

    loader = create_eval_loader(records, input_spec, batch_size=batch_size)
    logits, _ = predict_logits(_as_module(model), loader, device, tta=tta)  # (N, V, K)
    return probabilities_from_logits(logits, temperature), logits[:, 0].double().numpy()


class _ModelFnModule(torch.nn.Module):
    """A compressed artifact's model callable (ONNX Runtime session, TorchScript) seen by predict_logits as a
    module: predict_logits is the one TTA and batching path, and it calls .eval() on what it runs."""

    def __init__(self, model_fn: ModelFn) -> None:
        super().__init__()
        self.model_fn = model_fn

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.model_fn(images, metadata)  # (B, 3, H, W), (B, 14) -> (B, K)


def _as_module(model: ModelFn) -> torch.nn.Module:
    return model if isinstance(model, torch.nn.Module) else _ModelFnModule(model)


def _feature_dim(model: ModelFn) -> int | None:
    """The width of the model's penultimate features; None for a model callable that gives none (compressed)."""
    return getattr(model, "feature_dim", None) if hasattr(model, "forward_with_features") else None


class _FeaturesAndLogits(torch.nn.Module):
    """A LesionClassifier seen by predict_logits as one output: [features (B, D) | logits (B, K)]."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        features, logits = self.model.forward_with_features(images, metadata)  # (B, D), (B, K)
        return torch.cat([features, logits], dim=1)  # (B, D + K)


def predict_records_with_features(model: ModelFn, records: pd.DataFrame | list[dict[str, Any]],
                                  input_spec: dict[str, Any], temperature: float, tta: int, device: torch.device,
                                  batch_size: int = 64) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Records -> (identity-view features (N, D) | None, identity-view logits (N, K), calibrated probabilities
    (N, K) averaged over the TTA views): predict_records' path (create_eval_loader, predict_logits) in one pass.
    Features come from a float model (forward_with_features); a compressed artifact's callable gives None."""
    from dermaid.data.torch_dataset import create_eval_loader

    if _feature_dim(model) is None:
        probs, logits = predict_records(model, records, input_spec, temperature, tta, device, batch_size)
        return None, logits, probs
    loader = create_eval_loader(records, input_spec, batch_size=batch_size)
    joined, _ = predict_logits(_FeaturesAndLogits(model), loader, device, tta=tta)  # (N, V, D + K)
    num_classes = int(model.head.out_features)
    logits = joined[..., -num_classes:]  # (N, V, K)
    features = joined[:, 0, :-num_classes].double().numpy()  # (N, D)
    return features, logits[:, 0].double().numpy(), probabilities_from_logits(logits, temperature)


def submission_csv(image_ids: list[str], probs: np.ndarray, unk: np.ndarray | None = None) -> str:
    """The ISIC submission format: image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (UNK: the OOD detector's normalised
    score in [0, 1], or 0.0 when the checkpoint has none)."""
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(CLASS_CODES))
    frame[UNKNOWN_CODE] = 0.0 if unk is None else np.asarray(unk, dtype=np.float64)
    frame.insert(0, "image", image_ids)
    buf = io.StringIO()
    frame[["image", *SUBMISSION_CODES]].to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def ood_set_metrics(ood: OodScorer, inside: tuple[np.ndarray, np.ndarray], outside: tuple[np.ndarray, np.ndarray],
                    kinds: list[str]) -> dict[str, Any]:
    """Per fitted method: AUROC, FPR at 95% TPR and refused shares (at its validation threshold) of in-distribution
    (features, logits) against the OOD set's, overall and per OOD kind."""
    from dermaid.evaluation.ood import ood_metrics

    kind_array = np.asarray(kinds)
    report: dict[str, Any] = {"default_method": ood.method, "methods": {}}
    for method, threshold in ood.thresholds.items():
        in_scores, out_scores = ood.score(*inside, method=method), ood.score(*outside, method=method)  # (N,), (M,)
        per_kind = {kind: ood_metrics(in_scores, out_scores[kind_array == kind], threshold)
                    for kind in sorted(set(kinds))}
        report["methods"][method] = {**ood_metrics(in_scores, out_scores, threshold), "threshold": threshold,
                                     "per_kind": per_kind}
    return report


def triage_report(operating_point: dict[str, Any], probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The card's validation-chosen triage cut-off applied to these labelled images (probs (N, K), labels (N,))."""
    from dermaid.evaluation.operating_point import apply_cutoff

    codes = list(operating_point["malignant_codes"])
    columns = [CLASS_CODES.index(code) for code in codes]
    malignancy = probs[:, columns].sum(axis=1)  # (N,)
    is_malignant = np.isin(labels, columns)
    return {"malignant_codes": codes, "validation": {key: operating_point[key] for key in
                                                     ("target_sensitivity", "sensitivity", "specificity")},
            **apply_cutoff(malignancy, is_malignant, float(operating_point["cutoff"]))}


def _read_ood_records(url: str) -> list[dict[str, Any]]:
    """An OOD set from `dermaid synth kind=ood` as eval records: image bytes (no metadata, no label) + kind."""
    from dermaid.data.synth_ood import read_ood_set
    from dermaid.files import read_bytes

    rows = [{"image_id": image_url.rsplit("/", 1)[-1], "image": read_bytes(image_url), "kind": kind}
            for image_url, kind in read_ood_set(url)]
    if not rows:
        raise DermaidError(f"ood={url}: the OOD set holds no images")
    return rows


def _check_labels(records: pd.DataFrame, card: ModelCard, version_url: str) -> None:
    """Every label in the data must be a class the model predicts."""
    known = set(card.class_codes)
    labels = records["label"].dropna()
    unknown = sorted(set(labels) - known)
    if unknown:
        count = int(labels.isin(unknown).sum())
        raise DermaidError(f"{version_url}: {count} image(s) labelled {unknown}, a class the model does not "
                           f"know (its classes: {sorted(known)})")
