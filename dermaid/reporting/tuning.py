"""The tuning report: a `dermaid tune` directory -> trials table, metric against each hyperparameter, best config.

    trials = load_trials("runs/tune/toy")                 # the results table (one row per trial)
    params = hyperparameter_columns(trials)               # config/... columns that vary
    plot_metric_vs_hparams(trials, params, "val/balanced_accuracy")
    best_trial(trials, "val/balanced_accuracy", "max"); plot_trial_curves(trials, "val/balanced_accuracy")

The results table is `dermaid tune`'s DIR/results.csv: one row per trial with trial_id, status,
epochs, the best epoch's metrics, `config/<dotted.key>` columns for the sampled values and the
trial's run_dir (a `dermaid train` run directory with its history.csv).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermaid.errors import DermaidError
from dermaid.reporting.figures import create_figure
from dermaid.files import exists, join, read_text
from dermaid.tuning import CONFIG_PREFIX, RESULTS_FILE



def find_results(tune_dir: str, results_file: str = "") -> str:
    """The results table of a tuning directory: `results_file` (a name in tune_dir or a URL), else DIR/results.csv."""
    url = join(tune_dir, RESULTS_FILE)
    if results_file:
        url = results_file if "/" in results_file else join(tune_dir, results_file)
    if not exists(url):
        raise DermaidError(f"{url}: no results table; is tune_dir a `dermaid tune` output directory? "
                           "(or pass results_file=...)")
    return url


def load_trials(tune_dir: str, results_file: str = "") -> pd.DataFrame:
    """The results table (one row per trial; hyperparameters in `config/<dotted.key>` columns)."""
    url = find_results(tune_dir, results_file)
    try:
        table = pd.read_csv(io.StringIO(read_text(url)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DermaidError(f"{url}: not a readable CSV ({exc})") from None
    if table.empty:
        raise DermaidError(f"{url}: the results table has no trials")
    table.attrs["url"] = url
    return table


def hyperparameter_columns(trials: pd.DataFrame) -> list[str]:
    """The `config/...` columns whose value differs between trials (the searched hyperparameters)."""
    columns = [c for c in trials.columns if c.startswith(CONFIG_PREFIX)]
    return [c for c in columns if trials[c].astype(str).nunique(dropna=False) > 1]


def check_metric(trials: pd.DataFrame, metric: str, mode: str) -> None:
    if metric not in trials:
        numeric = [c for c in trials.columns if not c.startswith(CONFIG_PREFIX)
                   and pd.api.types.is_numeric_dtype(trials[c])]
        raise DermaidError(f"metric={metric!r} is not a column of {trials.attrs.get('url', 'the results table')}; "
                           f"numeric columns: {numeric}")
    if mode not in ("max", "min"):
        raise DermaidError(f"mode={mode!r}: expected max or min")


def trials_table(trials: pd.DataFrame, metric: str, mode: str = "max", extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Trials sorted best first: the metric, the searched hyperparameters (short names) and any extras present."""
    check_metric(trials, metric, mode)
    params = hyperparameter_columns(trials)
    keep = [c for c in ("trial_id", metric, *extra) if c in trials] + params
    table = trials[keep].sort_values(metric, ascending=(mode == "min"), na_position="last")
    table = table.rename(columns={c: c[len(CONFIG_PREFIX):] for c in params}).reset_index(drop=True)
    table.index.name = "rank"
    return table


def best_trial(trials: pd.DataFrame, metric: str, mode: str = "max") -> pd.Series:
    check_metric(trials, metric, mode)
    values = trials[metric].astype(float)
    if values.isna().all():
        raise DermaidError(f"metric={metric!r}: no trial reported it")
    return trials.loc[values.idxmax() if mode == "max" else values.idxmin()]


def plot_metric_vs_hparams(trials: pd.DataFrame, params: list[str], metric: str, mode: str = "max") -> Figure:
    """One panel per hyperparameter: the metric of every trial (numeric: scatter, log-x when it spans
    decades; categorical: points per value); the best trial is the red star."""
    check_metric(trials, metric, mode)
    n = max(1, len(params))
    ncols = min(3, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = create_figure(nrows, ncols, width=4.6 * ncols, height=3.6 * nrows, squeeze=False)
    best = best_trial(trials, metric, mode)
    for i in range(nrows * ncols):
        ax = axes[i // ncols][i % ncols]
        if i >= len(params):
            ax.axis("off")
            continue
        column = params[i]
        values = trials[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric:
            ax.scatter(values, trials[metric], color="tab:blue", alpha=0.7)
            ax.scatter([best[column]], [best[metric]], color="tab:red", marker="*", s=180, zorder=3)
            positive = values[values > 0]
            if len(positive) == len(values) and positive.max() / positive.min() >= 20:  # spans decades
                ax.set_xscale("log")
        else:
            labels = sorted(values.astype(str).unique())
            x = values.astype(str).map({v: k for k, v in enumerate(labels)})
            ax.scatter(x, trials[metric], color="tab:blue", alpha=0.7)
            ax.scatter([labels.index(str(best[column]))], [best[metric]], color="tab:red", marker="*", s=180,
                       zorder=3)
            ax.set_xticks(range(len(labels)), labels=labels, rotation=30, ha="right")
        ax.set_xlabel(column[len(CONFIG_PREFIX):])
        ax.set_ylabel(metric)
    if not params:
        axes[0][0].text(0.5, 0.5, "no hyperparameter varies between trials", ha="center", va="center")
    fig.suptitle(f"{metric} against each hyperparameter ({len(trials)} trials; star: best)")
    return fig


def plot_trial_curves(trials: pd.DataFrame, metric: str) -> Figure:
    """The metric per epoch of every trial (from each trial's history.csv): where ASHA stopped weak trials."""
    from dermaid.training.history import read_history

    fig, ax = create_figure(width=7, height=4)
    drawn = 0
    for _, trial in trials.iterrows():
        run_dir = trial.get("run_dir")
        if not isinstance(run_dir, str) or not exists(run_dir):
            continue
        history = read_history(run_dir)
        if metric in history and len(history):
            label = f"{trial.get('trial_id', drawn)} ({trial.get('status', '?')})"
            ax.plot(history["epoch"], history[metric], marker="o", label=label)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no trial histories found (run_dir column)", ha="center", va="center")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch and trial")
    if drawn:
        ax.legend(fontsize=7)
    return fig


def best_config(tune_dir: str, trials: pd.DataFrame, metric: str, mode: str = "max") -> dict[str, Any]:
    """The best trial's configuration: DIR/best's model card when the tuner saved one, else the table row."""
    card_url = join(tune_dir, "best", "card.json")
    if exists(card_url):
        card = json.loads(read_text(card_url))
        return {"source": card_url, "model": card.get("model"), "metrics": _scalars(card.get("metrics") or {}),
                "config": card.get("config")}
    best = best_trial(trials, metric, mode)
    params = {c[len(CONFIG_PREFIX):]: _plain(best[c]) for c in trials.columns if c.startswith(CONFIG_PREFIX)}
    return {"source": trials.attrs.get("url"), metric: _plain(best[metric]), "config": params}


def overrides(config: dict[str, Any], params: list[str]) -> str:
    """The searched hyperparameters as `dermaid train` overrides (key=value ...), from a flat config row."""
    return " ".join(f"{p[len(CONFIG_PREFIX):]}={config[p]}" for p in params if p in config)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def key_figures(trials: pd.DataFrame, metric: str, mode: str = "max") -> dict[str, Any]:
    best = best_trial(trials, metric, mode)
    figures = {
        "num_trials": int(len(trials)),
        "metric": metric,
        "mode": mode,
        f"best/{metric}": _plain(best[metric]),
        **{f"best/{c[len(CONFIG_PREFIX):]}": _plain(best[c]) for c in hyperparameter_columns(trials)},
    }
    if "trial_id" in trials:
        figures["best/trial_id"] = str(best["trial_id"])
    return figures
