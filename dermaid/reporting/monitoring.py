"""What notebooks/05-monitoring.ipynb imports: the window of the prediction log, drift against the reference
profile, rates over time, latency percentiles, agreement with dermatologists, and the figures.

    window = load_window(log_url, window_end="", window_hours=24, model_version="abc")   # Window(frame, start, end)
    table = drift_table(reference, window.frame)             # dermaid.monitoring.drift: alerts with thresholds
    rates = rates_over_time(window.frame, bin_minutes=60)    # class mix, malignancy rate, abstention rate per bin
    latency_percentiles(window.frame)                        # p50 / p95 / p99 per stage
    dermatologist_agreement(storage_url, window)             # reviewed uploads of the window: model vs consensus

Monitoring of a research tool; nothing here is a diagnosis.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermaid.classes import CLASS_CODES, MALIGNANT_CODES
from dermaid.errors import DermaidError
from dermaid.monitoring.drift import drift_table
from dermaid.reporting.figures import create_figure

__all__ = ["MALIGNANT_CODES", "Window", "dermatologist_agreement", "drift_figure", "drift_table", "latency_percentiles",
           "load_window", "ood_figure", "rates_figure", "rates_over_time"]
LATENCY_COLUMNS = {"latency_ms": "request", "decode_ms": "decode", "forward_ms": "forward"}


@dataclass
class Window:
    """The log rows of one window [start, end) of one model version."""

    frame: pd.DataFrame
    start: _dt.datetime
    end: _dt.datetime
    model_version: str

    @property
    def empty(self) -> bool:
        return self.frame.empty

    def describe(self) -> str:
        return (f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC, model version "
                f"{self.model_version or '(any)'}: {len(self.frame)} predictions")


def load_window(log_url: str, window_end: str = "", window_hours: float = 24.0, model_version: str = "") -> Window:
    """The prediction log's rows for the window ending at window_end (ISO time, UTC; empty: now)."""
    from dermaid.monitoring.log import read_log

    if window_hours <= 0:
        raise DermaidError(f"window_hours={window_hours}: the window must be longer than 0 hours")
    try:
        end = _dt.datetime.fromisoformat(window_end) if window_end else _dt.datetime.now(_dt.timezone.utc)
    except ValueError:
        raise DermaidError(f"window_end={window_end!r} is not an ISO time (2026-11-29T06:00)") from None
    end = end if end.tzinfo else end.replace(tzinfo=_dt.timezone.utc)
    start = end - _dt.timedelta(hours=float(window_hours))
    return Window(read_log(log_url, start, end, model_version or None), start, end, model_version)


def rates_over_time(frame: pd.DataFrame, bin_minutes: int = 60) -> pd.DataFrame:
    """Per time bin: predictions, the share of each top class (answered ones), the malignancy rate (share of
    answered predictions whose top class is malignant), the high-triage rate and the abstention rate."""
    if frame.empty:
        return pd.DataFrame()
    times = pd.to_datetime(frame["time"], utc=True).dt.floor(f"{int(bin_minutes)}min")
    answered = frame["abstain"].fillna(False) == False  # noqa: E712 - pandas' elementwise comparison
    rows = []
    for when, group in frame.groupby(times):
        ok = group[answered.loc[group.index]]
        row = {"time": when, "predictions": len(group),
               "abstention_rate": float(group["abstain"].fillna(False).astype(bool).mean()),
               "malignant_top_rate": float(ok["top_class"].isin(MALIGNANT_CODES).mean()) if len(ok) else np.nan,
               "high_triage_rate": float((ok["triage"] == "high").mean()) if len(ok) else np.nan}
        shares = ok["top_class"].value_counts(normalize=True)
        row.update({code: float(shares.get(code, 0.0)) for code in CLASS_CODES})
        rows.append(row)
    return pd.DataFrame(rows)


def latency_percentiles(frame: pd.DataFrame) -> pd.DataFrame:
    """p50 / p95 / p99 / max in ms per stage (request, decode, forward) over the window."""
    rows = []
    for column, stage in LATENCY_COLUMNS.items():
        values = pd.to_numeric(frame.get(column), errors="coerce").dropna() if column in frame else pd.Series()
        if len(values):
            rows.append({"stage": stage, "n": len(values), **{f"p{q}": float(np.percentile(values, q))
                                                              for q in (50, 95, 99)}, "max": float(values.max())})
    return pd.DataFrame(rows, columns=["stage", "n", "p50", "p95", "p99", "max"])


def dermatologist_agreement(storage_url: str, window: Window, db_url: str | None = None) -> dict[str, Any]:
    """Reviewed uploads created in the window (of its model version): how often the model's top class is the
    dermatologists' consensus. {"available": False, "why": ...} when there is no uploads store."""
    if not storage_url:
        return {"available": False, "why": "no storage_url given"}
    from dermaid.uploads.labels import LabelStore

    try:
        labels = LabelStore.open(storage_url, db_url, must_exist=True)
        reviewed = labels.labeled()
    except Exception as exc:  # noqa: BLE001 - the report goes on without this section, and says why
        return {"available": False, "why": f"uploads store {storage_url} not readable ({type(exc).__name__})"}
    rows = []
    for item in reviewed:
        upload = item["upload"]
        created = pd.Timestamp(upload["created"])
        created = created.tz_localize("UTC") if created.tzinfo is None else created.tz_convert("UTC")
        if not (pd.Timestamp(window.start) <= created < pd.Timestamp(window.end)):
            continue
        if window.model_version and upload["model_version"] != window.model_version:
            continue
        rows.append({"model": upload["top_class"], "consensus": item["agreement"]["consensus"],
                     "reviewers": item["agreement"]["reviewers"]})
    if not rows:
        return {"available": True, "reviewed": 0, "agreement": None}
    table = pd.DataFrame(rows)
    return {"available": True, "reviewed": len(table),
            "agreement": float((table["model"] == table["consensus"]).mean()),
            "table": pd.crosstab(table["consensus"], table["model"])}


def drift_figure(reference: pd.DataFrame, window: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """Reference vs window histogram per numeric feature tested, alerting ones titled in red."""
    numeric = table[(table["kind"] == "numeric") & table["p_value"].notna()]
    cols = 4
    rows = max(1, -(-len(numeric) // cols))
    fig, axes = create_figure(rows, cols, width=12, height=2.4 * rows, squeeze=False)
    for ax in axes.ravel()[len(numeric):]:
        ax.set_visible(False)
    for ax, (_, row) in zip(axes.ravel(), numeric.iterrows()):
        ref = pd.to_numeric(reference[row["feature"]], errors="coerce").dropna()
        win = pd.to_numeric(window[row["feature"]], errors="coerce").dropna()
        bins = np.histogram_bin_edges(np.r_[ref.to_numpy(), win.to_numpy()], bins=20)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
        ax.hist(win, bins=bins, density=True, alpha=0.5, label="window")
        ax.set_title(f"{row['feature']}  D={row['value']:.2f}", fontsize=9,
                     color="tab:red" if row["alert"] else "black")
        ax.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=7)
    return fig


def rates_figure(rates: pd.DataFrame) -> Figure:
    """Class mix (stacked shares) and the malignancy, high-triage and abstention rates per time bin."""
    fig, (mix, rate) = create_figure(1, 2, width=12, height=3.5)
    x = np.arange(len(rates))
    bottom = np.zeros(len(rates))
    for code in CLASS_CODES:
        mix.bar(x, rates[code], bottom=bottom, label=code)
        bottom += rates[code].fillna(0).to_numpy()
    mix.set_title("class mix of answered predictions")
    mix.legend(fontsize=7, ncol=4)
    for column in ("malignant_top_rate", "high_triage_rate", "abstention_rate"):
        rate.plot(x, rates[column], marker="o", label=column.replace("_", " "))
    rate.set_ylim(0, 1)
    rate.set_title("rates per bin")
    rate.legend(fontsize=7)
    labels = [t.strftime("%m-%d %H:%M") for t in rates["time"]]
    for ax in (mix, rate):
        ax.set_xticks(x, labels, rotation=45, fontsize=7)
    return fig


def ood_figure(reference: pd.DataFrame, window: pd.DataFrame, threshold: float | None) -> Figure:
    """OOD score distribution of the window against the reference, with the card's abstention threshold."""
    fig, ax = create_figure(width=6, height=3.5)
    ref = pd.to_numeric(reference["ood_score"], errors="coerce").dropna()
    win = pd.to_numeric(window["ood_score"], errors="coerce").dropna()
    if len(ref) + len(win):
        bins = np.histogram_bin_edges(np.r_[ref.to_numpy(), win.to_numpy()], bins=30)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label="reference (validation)")
        ax.hist(win, bins=bins, density=True, alpha=0.5, label="window")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label="abstention threshold")
    ax.set_xlabel("OOD score (higher: less like the training images)")
    ax.legend(fontsize=7)
    return fig
