"""The compare-runs report (notebooks/06-compare-runs.ipynb): runs of the runs table side by side.

    table = runs_table("runs")                                   # dermaid.runs
    chosen = choose_runs(table, names=[], max_runs=6)            # readable runs with a checkpoint
    preds = predict_runs(chosen, split="val")                    # name -> Predictions (dermaid.reporting.training)
    metrics = {name: compute_metrics(p.labels, p.probs) for name, p in preds.items()}
    plot_metric_per_run(chosen, "balanced_accuracy"); plot_sensitivity_bars(metrics)
    plot_reliability_overlay(preds); plot_confusion_difference(metrics, a, b)

Every run's checkpoint is re-run on its own validation fold (or the held-out test part) through the training
report's path, so the figures of different runs are measured the same way. Runs on different dataset versions
or folds see different images: the table says which version each used. Research comparison, never a diagnosis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermaid.classes import CLASS_CODES
from dermaid.errors import DermaidError
from dermaid.reporting.figures import create_figure
from dermaid.reporting.training import Predictions, calibration_summary, load_run, predict_split, reliability_bins

COMPARED_KINDS = ("train", "trial", "tune", "cv-fold", "registered")  # rows with one checkpoint to re-run
METRICS = ("balanced_accuracy", "auc_macro", "ece", "ece_calibrated")


def choose_runs(table: pd.DataFrame, names: list[str] | tuple[str, ...] = (), max_runs: int = 6,
                metric: str = "balanced_accuracy") -> pd.DataFrame:
    """The rows to compare: those named (in that order), else the best `max_runs` readable runs by `metric`."""
    usable = table[table["kind"].isin(COMPARED_KINDS) & table["problem"].isna() & table["checkpoint"].notna()]
    if names:
        unknown = [n for n in names if n not in set(usable["name"])]
        if unknown:
            raise DermaidError(f"runs: {unknown} not among the readable runs with a checkpoint: {list(usable['name'])}")
        return usable.set_index("name").loc[list(names)].reset_index()[usable.columns]
    if usable.empty:
        raise DermaidError(f"no readable run with a checkpoint under {table.attrs.get('root')}")
    ascending = metric.startswith("ece")
    return usable.sort_values(metric, ascending=ascending, na_position="last", kind="stable").head(max_runs)


def predict_runs(chosen: pd.DataFrame, split: str = "val", prepared_dir: str = "", batch_size: int = 64,
                 on_progress: Any = print) -> dict[str, Predictions]:
    """name -> the checkpoint's predictions on `split` (its own run's validation fold for val), in table order."""
    preds: dict[str, Predictions] = {}
    for i, (_, row) in enumerate(chosen.iterrows(), start=1):
        run_dir, checkpoint = str(row["checkpoint"]).rstrip("/").rsplit("/", 1)
        run = load_run(run_dir, checkpoint)
        preds[row["name"]] = predict_split(run, split=split, prepared_dir=prepared_dir, batch_size=batch_size)
        if on_progress:
            on_progress(f"[{i}/{len(chosen)}] {row['name']}: {len(preds[row['name']].labels)} images predicted")
    return preds


def metric_table(chosen: pd.DataFrame, preds: dict[str, Predictions], metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per run: re-measured balanced accuracy, macro AUC, ECE before/after T, and what the table says."""
    rows = []
    for _, row in chosen.iterrows():
        name = row["name"]
        calibration = calibration_summary(preds[name])
        rows.append({"run": name, "kind": row["kind"], "model": row["model"], "image_size": row["image_size"],
                     "dataset_version": row["dataset_version"], "images": len(preds[name].labels),
                     "balanced_accuracy": metrics[name]["balanced_accuracy"], "auc_macro": metrics[name]["auc_macro"],
                     "ece": calibration["ece"], "ece_calibrated": calibration["ece_calibrated"],
                     "config_diff": row.get("config_diff")})
    return pd.DataFrame(rows).set_index("run")


def plot_metric_per_run(table: pd.DataFrame, metrics: tuple[str, ...] = ("balanced_accuracy", "auc_macro",
                                                                        "ece_calibrated")) -> Figure:
    """One horizontal bar panel per metric, one bar per run (index: run names)."""
    fig, axes = create_figure(1, len(metrics), width=4.6 * len(metrics), height=0.5 * len(table) + 1.6,
                              squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = table[metric].astype(float)
        ax.barh([str(n) for n in table.index], values, color="tab:purple" if metric.startswith("ece") else "tab:blue")
        for y, value in enumerate(values):
            if np.isfinite(value):
                ax.annotate(f"{value:.3f}", (value, y), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.1)
        ax.set_title(metric + (" (lower is better)" if metric.startswith("ece") else ""))
    return fig


def sensitivity_table(metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Per-class sensitivity (rows: classes, columns: runs; dermaid.evaluation.metrics' definition)."""
    return pd.DataFrame({name: {code: m["per_class"][code]["sensitivity"] for code in CLASS_CODES}
                         for name, m in metrics.items()}).reindex(list(CLASS_CODES))


def plot_sensitivity_bars(metrics: dict[str, dict[str, Any]]) -> Figure:
    """Grouped bars: each class's sensitivity, one bar per run (support in the class label)."""
    table = sensitivity_table(metrics)
    support = {code: int(next(iter(metrics.values()))["per_class"][code]["support"]) for code in CLASS_CODES}
    fig, ax = create_figure(width=max(8.0, 1.1 * len(CLASS_CODES) + 0.3 * len(metrics)), height=4.2)
    width = 0.8 / max(1, len(table.columns))
    x = np.arange(len(table.index))  # (K,)
    for i, name in enumerate(table.columns):
        ax.bar(x + (i - (len(table.columns) - 1) / 2) * width, table[name].astype(float), width=width * 0.95,
               label=str(name))
    ax.set_xticks(x, labels=[f"{code}\n(n={support[code]})" for code in table.index])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("sensitivity")
    ax.set_title("Per-class sensitivity (first run's support shown)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_reliability_overlay(preds: dict[str, Predictions], n_bins: int = 10) -> Figure:
    """Accuracy against confidence of the calibrated probabilities, one curve per run (ECE in the legend)."""
    fig, ax = create_figure(width=6.5, height=6)
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, p in preds.items():
        bins = reliability_bins(p.probs, p.labels, n_bins).dropna()
        ece = calibration_summary(p)["ece_calibrated"]
        ax.plot(bins["confidence"], bins["accuracy"], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability, after temperature scaling)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability per run")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def confusion_shares(metrics: dict[str, Any]) -> np.ndarray:
    """Row-normalised confusion matrix (K, K): each true class's share predicted as each class."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)  # (K, K) rows: truth
    rows = cm.sum(axis=1, keepdims=True)  # (K, 1)
    return np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)


def plot_confusion_difference(metrics: dict[str, dict[str, Any]], first: str, second: str) -> Figure:
    """Row-normalised confusion matrix of `second` minus `first`: blue where `second` puts more of a class."""
    diff = confusion_shares(metrics[second]) - confusion_shares(metrics[first])  # (K, K)
    fig, ax = create_figure(width=7.5, height=6.5)
    image = ax.imshow(diff, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    codes = list(metrics[first]["classes"])
    ax.set_xticks(range(len(codes)), labels=codes, rotation=45, ha="right")
    ax.set_yticks(range(len(codes)), labels=codes)
    for (r, c), value in np.ndenumerate(diff):
        if np.isfinite(value) and abs(value) >= 0.005:
            ax.text(c, r, f"{value:+.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > 0.6 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{second} minus {first} (row shares; diagonal: recall gained)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def pick_pair(metric_rows: pd.DataFrame, pair: list[str] | tuple[str, ...] = (), baseline: str | None = None,
              metric: str = "balanced_accuracy") -> tuple[str, str]:
    """The two runs whose confusion matrices are compared: as given, else the baseline (or the weakest) and the
    best other run by `metric`."""
    names = list(metric_rows.index)
    if pair:
        if len(pair) != 2 or any(p not in names for p in pair):
            raise DermaidError(f"pair={list(pair)}: name two of the compared runs {names}")
        return str(pair[0]), str(pair[1])
    if len(names) < 2:
        raise DermaidError(f"a confusion-matrix difference needs two runs; only {names} can be compared")
    ranked = metric_rows[metric].astype(float).sort_values(ascending=metric.startswith("ece"))
    first = baseline if baseline in names else str(ranked.index[-1])
    second = next(str(n) for n in ranked.index if n != first)
    return first, second


def key_figures(metric_rows: pd.DataFrame, sensitivities: pd.DataFrame, pair: tuple[str, str]) -> dict[str, Any]:
    """What automation reads from the comparison: per run its metrics and per-class sensitivity; the pair."""
    figures: dict[str, Any] = {"num_runs": int(len(metric_rows)), "pair": list(pair)}
    for name, row in metric_rows.iterrows():
        for metric in METRICS:
            figures[f"{name}/{metric}"] = float(row[metric])
        for code in CLASS_CODES:
            figures[f"{name}/sensitivity/{code}"] = float(sensitivities.loc[code, name])
    best = metric_rows["balanced_accuracy"].astype(float).idxmax()
    figures["best/run"] = str(best)
    figures["best/balanced_accuracy"] = float(metric_rows.loc[best, "balanced_accuracy"])
    return figures
