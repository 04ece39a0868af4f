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

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dermaid.errors import DermaidError
from dermaid.files import exists, join
from dermaid.reporting.figures import create_figure
from dermaid.tuning.layout import BEST_DIR, CONFIG_PREFIX, RESULTS_FILE
from dermaid.tuning.results import best_row, format_overrides, hyperparameter_keys, read_results


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
    """The results table (one row per trial; hyperparameters in `config/<dotted.key>` columns), read by
    the same function as `dermaid tune` itself (dermaid.tuning.results.read_results)."""
    table = read_results(find_results(tune_dir, results_file))
    if table.empty:
        raise DermaidError(f"{table.attrs['url']}: the results table has no trials")
    return table


def hyperparameter_columns(trials: pd.DataFrame) -> list[str]:
    """The `config/...` columns whose value differs between trials (the searched hyperparameters)."""
    return [c for c in hyperparameter_keys(trials) if trials[c].astype(str).nunique(dropna=False) > 1]


def check_metric(trials: pd.DataFrame, metric: str, mode: str) -> None:
    """DermaidError unless `metric` is a column of the table and `mode` is max or min."""
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
    """The row of the best trial (the first of equals), as `dermaid tune` ranks them."""
    check_metric(trials, metric, mode)
    best = best_row(trials, metric, mode)
    if best is None:
        raise DermaidError(f"metric={metric!r}: no trial reported it")
    return best


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
    from dermaid.models.card import CARD_FILE, load_card

    card_url = join(tune_dir, BEST_DIR, CARD_FILE)
    if exists(card_url):
        card = load_card(join(tune_dir, BEST_DIR))
        return {"source": card_url, "model": card.model, "metrics": _scalars(card.metrics), "config": card.config}
    best = best_trial(trials, metric, mode)
    params = {c[len(CONFIG_PREFIX):]: _plain(best[c]) for c in hyperparameter_keys(trials)}
    return {"source": trials.attrs.get("url"), metric: _plain(best[metric]), "config": params}


def overrides(config: dict[str, Any], params: list[str]) -> str:
    """The searched hyperparameters as `dermaid train` overrides (key=value ...), from a flat config row."""
    return format_overrides(config, params)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def key_figures(trials: pd.DataFrame, metric: str, mode: str = "max") -> dict[str, Any]:
    """The report's key figures: trial count, the best trial's metric, hyperparameters and id."""
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
