"""The results table of a search, DIR/results.csv: one row per trial, kept current while the search runs.

    trial_id, status, epochs, <metric>, best_epoch, val/auc_macro, val/loss, seconds, config/<key>..., run_dir

A row comes from the trial's own `dermaid train` run directory (history.csv: the epochs its trainer
reported to Tune, readable while the search runs and after a Ctrl-C, when Tune's ResultGrid does not
exist yet) and from DIR/trials.log (what Tune's status cannot say: a trial Tune stopped for a Ctrl-C is
TERMINATED in memory, yet its saved state resumes it). Everything that reads the table (the end of a
search, the tuning report) reads it through `read_results`.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pandas as pd

from dermaid.errors import DermaidError
from dermaid.files import exists, join, read_text, write_text
from dermaid.tuning.layout import CONFIG_PREFIX, RESULTS_FILE, trial_run_dir

STATUSES_FINISHED = ("completed", "stopped", "error")
EXTRA_METRICS = ("val/auc_macro", "val/loss")  # shown beside the tuned metric, at the same (best) epoch


def trial_row(out: str, trial_id: str, event: str | None, tune_status: str, config: dict[str, Any], metric: str,
              mode: str, keys: list[str]) -> dict[str, Any]:
    """One results-table row: status, epochs run, the best epoch's metrics (history.csv) and the sampled values."""
    from dermaid.training.history import read_history

    run_dir = trial_run_dir(out, trial_id)
    history = read_history(run_dir)
    row: dict[str, Any] = {"trial_id": trial_id, "status": _status(run_dir, event, tune_status),
                           "epochs": int(history["epoch"].max()) if len(history) else 0}
    if len(history) and metric in history and history[metric].notna().any():
        values = history[metric].astype(float)
        best = history.loc[values.idxmax() if mode == "max" else values.idxmin()]
        row.update({metric: float(best[metric]), "best_epoch": int(best["epoch"])})
        for extra in EXTRA_METRICS:
            if extra in history and extra != metric:
                row[extra] = float(best[extra])
        row["seconds"] = round(float(history["seconds"].sum()), 1) if "seconds" in history else math.nan
    else:
        row.update({metric: math.nan, "best_epoch": math.nan})
    for key in keys:
        value = config.get(key)  # a trial Tune has not sampled yet has no value
        row[CONFIG_PREFIX + key] = value.item() if hasattr(value, "item") else value
    row["run_dir"] = run_dir
    return row


def _status(run_dir: str, event: str | None, tune_status: str) -> str:
    """completed (its trainer finished), stopped (by ASHA or the time budget), error; else unfinished/pending.

    From DIR/trials.log, not Tune's status alone: Tune marks the trials it stops for a Ctrl-C TERMINATED
    in memory too, although its saved state resumes them.
    """
    if event == "error" or tune_status == "ERROR":
        return "error"
    if event == "end":
        # train() writes summary.json when its trainer finishes; a trial Tune stopped never gets there
        return "completed" if exists(join(run_dir, "summary.json")) else "stopped"
    return "pending" if tune_status == "PENDING" and event is None else "unfinished"


def write_results(out: str, rows: list[dict[str, Any]]) -> str:
    """DIR/results.csv, trials in creation order; returns its URL."""
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False, lineterminator="\n", float_format="%.6g")
    url = join(out, RESULTS_FILE)
    write_text(url, buf.getvalue())
    return url


def read_results(url: str) -> pd.DataFrame:
    """A results table (DIR/results.csv or a copy) as a DataFrame; `attrs["url"]` says where it came from.
    An empty frame when the file does not exist yet; DermaidError when it is not a readable CSV."""
    if not exists(url):
        table = pd.DataFrame()
    else:
        try:
            table = pd.read_csv(io.StringIO(read_text(url)))
        except pd.errors.EmptyDataError:
            table = pd.DataFrame()
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DermaidError(f"{url}: not a readable CSV ({exc})") from None
    table.attrs["url"] = url
    return table


def best_row(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trial with the best `metric` (the first of equals); None when no trial reported it."""
    if metric not in trials or trials[metric].isna().all():
        return None
    values = trials[metric].astype(float)
    return trials.loc[values.idxmax() if mode == "max" else values.idxmin()]


def hyperparameter_keys(trials: pd.DataFrame) -> list[str]:
    """The `config/<key>` columns of a results table, in order."""
    return [c for c in trials.columns if c.startswith(CONFIG_PREFIX)]


def format_overrides(row: pd.Series | dict[str, Any], columns: list[str]) -> str:
    """A row's values of `columns` (config/<key>) as `dermaid train` overrides: `key=value ...`."""
    return " ".join(f"{c[len(CONFIG_PREFIX):]}={row[c]}" for c in columns if c in row)


def format_results(trials: pd.DataFrame, metric: str, mode: str) -> str:
    """The results table as text, best trial first, hyperparameters under their short names."""
    frame = trials.drop(columns=["run_dir"], errors="ignore")
    frame = frame.rename(columns={c: c[len(CONFIG_PREFIX):] for c in hyperparameter_keys(frame)})
    frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last")
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")
