"""The training report: a run directory -> learning curves, ISIC metrics, calibration, subgroups, errors
(and, in dermaid.reporting.abstention, the checkpoint's OOD detector and triage cut-off).

    run = load_run("runs/toy")                       # card, config, summary, history of DIR
    preds = predict_split(run, split="val")          # the checkpoint's logits + features on the run's val fold
    metrics = compute_metrics(preds.labels, preds.probs)   # dermaid.evaluation.metrics
    plot_learning_curves(run.history, run.best_epoch); plot_confusion_matrix(metrics) ...

Metrics and calibration numbers come from dermaid.evaluation; this module only arranges and plots them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sklearn.metrics
from matplotlib.figure import Figure

from dermaid.classes import BY_CODE, CLASS_CODES
from dermaid.errors import DermaidError
from dermaid.evaluation.calibration import calibration_report, softmax_with_temperature
from dermaid.evaluation.metrics import compute_metrics, predicted_labels
from dermaid.models.card import ModelCard
from dermaid.reporting.abstention import Abstention, abstention_figures
from dermaid.reporting.eda import MISSING, age_band
from dermaid.reporting.figures import create_figure, heatmap, image_grid
from dermaid.files import exists, join, read_text

RELIABILITY_BINS = 10  # bins of the reliability diagram (ECE itself uses calibration's default)
SUBGROUP_COLUMNS = ("sex", "age_band", "site")


@dataclass
class Run:
    """What a training run directory holds (docs/interfaces.md: run directories)."""

    run_dir: str
    checkpoint: str
    card: ModelCard
    config: dict[str, Any]
    summary: dict[str, Any]
    history: pd.DataFrame

    @property
    def best_epoch(self) -> int | None:
        epoch = self.summary.get("best_epoch", self.card.epoch)
        return None if epoch is None else int(epoch)

    @property
    def temperature(self) -> float:
        return self.card.temperature


@dataclass
class Predictions:
    """A split predicted by a checkpoint; rows aligned with `records` (image bytes included)."""

    records: pd.DataFrame
    labels: np.ndarray                  # (N,) class indices
    logits: np.ndarray                  # (N, K) identity-view logits
    temperature: float
    split: str
    version_url: str
    features: np.ndarray | None = None  # (N, D) forward_with_features' features (feature-space OOD detectors)
    probs: np.ndarray = field(init=False)      # (N, K) softmax(logits / T): what users get
    probs_raw: np.ndarray = field(init=False)  # (N, K) softmax(logits): before temperature scaling

    def __post_init__(self) -> None:
        self.probs = softmax_with_temperature(self.logits, self.temperature)
        self.probs_raw = softmax_with_temperature(self.logits, 1.0)


def load_run(run_dir: str, checkpoint: str = "best") -> Run:
    """Read DIR/<checkpoint>/card.json, DIR/config.yaml, DIR/summary.json and DIR/history.csv."""
    from omegaconf import OmegaConf

    from dermaid.models.card import load_card
    from dermaid.training.history import read_history

    if not exists(run_dir):
        raise DermaidError(f"run_dir={run_dir}: no such run directory")
    ckpt = join(run_dir, checkpoint)
    if not exists(join(ckpt, "card.json")):
        raise DermaidError(f"run_dir={run_dir}: no {checkpoint}/card.json; is it a `dermaid train` run directory?")
    card = load_card(ckpt)
    config_url = join(run_dir, "config.yaml")
    config = (OmegaConf.to_container(OmegaConf.create(read_text(config_url))) if exists(config_url)
              else dict(card.config))
    summary_url = join(run_dir, "summary.json")
    summary = json.loads(read_text(summary_url)) if exists(summary_url) else {}
    return Run(run_dir, ckpt, card, config, summary, read_history(run_dir))


def resolve_version_url(run: Run, prepared_dir: str = "") -> str:
    """The prepared dataset version the run trained on: <prepared_dir>/<dataset_version>."""
    from dermaid.reporting.runner import project_path

    version = run.card.dataset_version or run.config.get("dataset_version")
    prepared = prepared_dir or (run.config.get("data") or {}).get("prepared_dir")
    if not version or not prepared:
        raise DermaidError(f"{run.run_dir}: the run names no dataset version / prepared_dir; pass prepared_dir=...")
    url = join(project_path(str(prepared)), str(version))
    if not exists(join(url, "manifest.json")):
        raise DermaidError(f"{url}: dataset version {version} of run {run.run_dir} is not there; pass prepared_dir=...")
    return url


def predict_split(run: Run, split: str = "val", prepared_dir: str = "", batch_size: int = 64,
                  device: str = "cpu") -> Predictions:
    """Logits and features of the run's checkpoint on a split (val: the run's validation fold; test: held-out
    part), through calibrate's path (dermaid.evaluation.calibrate.record_outputs: evaluate's eval transform)."""
    import torch

    from dermaid.evaluation.calibrate import labelled_records, record_outputs
    from dermaid.models.card import load_float_model

    if split not in ("val", "test", "all"):
        raise DermaidError(f"split={split!r}: expected val, test or all")
    version_url = resolve_version_url(run, prepared_dir)
    fold = int(run.config["data"]["fold"])  # every run config has it (conf/data/)
    records = labelled_records(version_url, split, fold)
    model, card = load_float_model(run.checkpoint, device)
    outputs = record_outputs(model, card, records, torch.device(device), batch_size)
    return Predictions(records, outputs["labels"].astype(int), outputs["logits"], run.temperature, split,
                       version_url, features=outputs["features"])


# --------------------------------------------------------------------------- learning curves

def plot_learning_curves(history: pd.DataFrame, best_epoch: int | None = None) -> Figure:
    """Loss, validation metrics and learning rate per epoch (best epoch marked)."""
    fig, axes = create_figure(1, 3, width=14, height=3.8)
    panels = (
        (axes[0], ("train/loss", "val/loss"), "loss"),
        (axes[1], ("val/balanced_accuracy", "val/auc_macro", "val/ece"), "validation"),
        (axes[2], ("lr",), "learning rate"),
    )
    for ax, columns, title in panels:
        for column in columns:
            if column in history and history[column].notna().any():
                ax.plot(history["epoch"], history[column], marker="o", label=column)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- ISIC metrics

def metrics_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """compute_metrics' per-class table as a DataFrame (class order; a macro row at the end)."""
    table = pd.DataFrame(metrics["per_class"]).T.reindex(list(metrics["classes"]))
    table.insert(0, "name", [BY_CODE[c].name if c in BY_CODE else c for c in table.index])
    table["support"] = table["support"].astype(int)
    macro = {"name": "macro mean", "support": int(table["support"].sum()),
             "sensitivity": metrics["sensitivity_macro"], "specificity": metrics["specificity_macro"],
             "auc": metrics["auc_macro"], "ap": metrics["ap_macro"]}
    table.loc["macro"] = macro
    table.index.name = "class"
    return table.round(3)


def plot_confusion_matrix(metrics: dict[str, Any]) -> Figure:
    """Counts and row-normalised shares (recall on the diagonal) of arg-max predictions."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)  # (K, K) rows: truth
    codes = list(metrics["classes"])
    rows = cm.sum(axis=1, keepdims=True)  # (K, 1)
    shares = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    fig, (left, right) = create_figure(1, 2, width=13, height=5.5)
    heatmap(left, cm, codes, codes)
    left.set_title("Confusion matrix (counts)")
    heatmap(right, shares, codes, codes, fmt="{:.2f}", vmax=1.0)
    right.set_title(f"Row-normalised (diagonal: recall); balanced accuracy {metrics['balanced_accuracy']:.3f}")
    for ax in (left, right):
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return fig


def plot_roc_curves(labels: np.ndarray, probs: np.ndarray, metrics: dict[str, Any]) -> Figure:
    """One-vs-rest ROC curve per class present (AUC in the legend from `metrics`)."""
    fig, ax = create_figure(width=6.5, height=6)
    for k, code in enumerate(CLASS_CODES):
        truth = np.asarray(labels) == k  # (N,)
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = sklearn.metrics.roc_curve(truth, np.asarray(probs)[:, k])
        ax.plot(fpr, tpr, label=f"{code} (AUC {metrics['per_class'][code]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC per class (one vs rest); macro AUC {metrics['auc_macro']:.3f}")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------------- calibration

def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS) -> pd.DataFrame:
    """Top-label confidence vs accuracy per equal-width bin (the bins behind the ECE)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)  # (N,)
    correct = probs.argmax(axis=1) == np.asarray(labels)  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = index == b
        rows.append({"low": edges[b], "high": edges[b + 1], "count": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                     "accuracy": float(correct[mask].mean()) if mask.any() else np.nan})
    return pd.DataFrame(rows)


def calibration_summary(preds: Predictions) -> dict[str, float]:
    """NLL and ECE before and after scaling with the card's temperature (dermaid.evaluation.calibration)."""
    return calibration_report(preds.logits, preds.labels, temperature=preds.temperature)


def plot_reliability(preds: Predictions, n_bins: int = RELIABILITY_BINS) -> Figure:
    """Reliability diagrams before and after temperature scaling, with each side's ECE."""
    summary = calibration_summary(preds)
    fig, axes = create_figure(1, 2, width=11, height=4.8)
    sides = ((axes[0], preds.probs_raw, "before (T = 1)", summary["ece"]),
             (axes[1], preds.probs, f"after (T = {preds.temperature:.2f})", summary["ece_calibrated"]))
    for ax, probs, title, ece in sides:
        bins = reliability_bins(probs, preds.labels, n_bins)
        centers = (bins["low"] + bins["high"]) / 2
        width = 1.0 / n_bins
        ax.bar(centers, bins["accuracy"].fillna(0), width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        gap = (bins["confidence"] - bins["accuracy"]).fillna(0)
        ax.bar(centers, gap, bottom=bins["accuracy"].fillna(0), width=width * 0.95, color="tab:red", alpha=0.3,
               label="gap to confidence")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        for x, n in zip(centers, bins["count"]):
            if n:
                ax.annotate(str(n), (x, 0.02), ha="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {ece:.3f}")
        ax.legend(fontsize=7, loc="upper left")
    return fig


# --------------------------------------------------------------------------- subgroups

def subgroup_metrics(preds: Predictions, column: str, min_images: int = 1) -> pd.DataFrame:
    """ISIC metrics of each subgroup (sex, age_band, site; "missing" is a group of its own)."""
    values = _subgroup_values(preds.records, column)
    rows = []
    for value in sorted(values.unique(), key=lambda v: (v == MISSING, str(v))):
        mask = (values == value).to_numpy()
        if mask.sum() < min_images:
            continue
        m = compute_metrics(preds.labels[mask], preds.probs[mask])
        rows.append({column: value, "images": int(mask.sum()),
                     "classes": int(len(np.unique(preds.labels[mask]))),
                     "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
                     "auc_macro": m["auc_macro"]})
    return pd.DataFrame(rows).set_index(column).round(3)


def _subgroup_values(records: pd.DataFrame, column: str) -> pd.Series:
    if column == "age_band":
        return age_band(records["age"])
    if column not in records:
        raise DermaidError(f"subgroup column {column!r} is not in the records; use one of {SUBGROUP_COLUMNS}")
    return records[column].where(records[column].notna(), MISSING)


def plot_subgroups(tables: dict[str, pd.DataFrame], overall: float) -> Figure:
    """Balanced accuracy per subgroup, one panel per grouping; the dashed line is the whole split."""
    fig, axes = create_figure(1, len(tables), width=4.8 * len(tables), height=4, squeeze=False)
    for ax, (column, table) in zip(axes[0], tables.items()):
        ax.barh([f"{v} (n={n})" for v, n in zip(table.index, table["images"])], table["balanced_accuracy"],
                color="tab:cyan")
        ax.axvline(overall, color="gray", linestyle="--", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("balanced accuracy")
        ax.set_title(column)
    return fig


# --------------------------------------------------------------------------- errors

def most_confident_errors(preds: Predictions, k: int = 6) -> pd.DataFrame:
    """The k wrong predictions with the highest predicted-class probability."""
    pred = predicted_labels(preds.probs)  # (N,)
    confidence = preds.probs.max(axis=1)  # (N,)
    wrong = np.flatnonzero(pred != preds.labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    return pd.DataFrame({
        "row": order,
        "image_id": preds.records["image_id"].to_numpy()[order],
        "true": [CLASS_CODES[preds.labels[i]] for i in order],
        "predicted": [CLASS_CODES[pred[i]] if pred[i] >= 0 else "undecided" for i in order],
        "confidence": confidence[order].round(3),
        "p_true": preds.probs[order, preds.labels[order]].round(3),
    })


def plot_error_overlays(explainer: Any, preds: Predictions, errors: pd.DataFrame, method: str = "gradcam") -> Figure:
    """Per error: the input, the CAM for the predicted class and the CAM for the true class."""
    from dermaid.reporting.saliency import _thumb, explain_row

    cells, labels, captions = [], [], []
    for _, err in errors.iterrows():
        row = preds.records.iloc[int(err["row"])]
        predicted = err["predicted"] if err["predicted"] in CLASS_CODES else None
        pred_cam = explain_row(explainer, row, method=method, target=predicted)
        true_cam = explain_row(explainer, row, method=method, target=err["true"])
        original = explainer.predictor.prepare(bytes(row["image"])).image
        cells.append([_thumb(original), _thumb(pred_cam.overlay), _thumb(true_cam.overlay)])
        labels.append(str(err["image_id"]))
        captions.append([f"true {err['true']}", f"{pred_cam.target} p={pred_cam.probability:.2f}",
                         f"{true_cam.target} p={true_cam.probability:.2f}"])
    if not cells:
        fig, ax = create_figure(width=4, height=1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no errors on this split", ha="center", va="center")
        return fig
    return image_grid(cells, row_labels=labels, captions=captions,
                      col_labels=["input", f"{method}: predicted class", f"{method}: true class"],
                      title="Most confident errors")


# --------------------------------------------------------------------------- key figures

def key_figures(run: Run, preds: Predictions, metrics: dict[str, Any], subgroups: dict[str, pd.DataFrame] | None = None,
                abstention: Abstention | None = None) -> dict[str, Any]:
    """The numbers automation tracks for a training run (metric names `split/metric`); with `abstention`
    (abstention.check_abstention) also the OOD detector's and the triage cut-off's (abstention_figures)."""
    split = preds.split
    calibration = calibration_summary(preds)
    figures: dict[str, Any] = {
        "run_dir": run.run_dir,
        "checkpoint": run.checkpoint,
        "dataset_version": preds.version_url.rstrip("/").rsplit("/", 1)[-1],
        "best_epoch": run.best_epoch,
        "epochs": int(len(run.history)),
        f"{split}/num_images": int(len(preds.labels)),
        f"{split}/balanced_accuracy": metrics["balanced_accuracy"],
        f"{split}/accuracy": metrics["accuracy"],
        f"{split}/auc_macro": metrics["auc_macro"],
        f"{split}/ece": calibration["ece"],
        f"{split}/ece_calibrated": calibration["ece_calibrated"],
        f"{split}/nll": calibration["nll"],
        f"{split}/nll_calibrated": calibration["nll_calibrated"],
        "temperature": preds.temperature,
        **{f"{split}/sensitivity/{c}": row["sensitivity"] for c, row in metrics["per_class"].items()},
    }
    for column, table in (subgroups or {}).items():
        if len(table):
            figures[f"{split}/worst_balanced_accuracy/{column}"] = float(table["balanced_accuracy"].min())
    if abstention is not None:
        figures.update(abstention_figures(abstention))
    return figures
