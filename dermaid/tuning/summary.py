"""The end of a search: print the results table, pick the best trial from Ray Tune's ResultGrid, copy its
best checkpoint to DIR/best and write DIR/summary.json.

The best trial is Tune's own `ResultGrid.get_best_result(metric, mode, scope="all")` (every epoch each
trial reported), provided that trial finished (completed or stopped, not failed or interrupted) and left
a checkpoint; otherwise the best such trial in the results table.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from dermaid.classes import DISCLAIMER
from dermaid.errors import DermaidError
from dermaid.files import exists, join, read_bytes, write_text
from dermaid.tuning.layout import BEST_DIR, RESULTS_FILE, SUMMARY_FILE, TUNE_DIR_NAME
from dermaid.tuning.results import (STATUSES_FINISHED, best_row, format_overrides, format_results,
                                    hyperparameter_keys, read_results)

BUDGET_SPENT_FRACTION = 0.95  # a search this close to its time budget ended because of it, not a Ctrl-C


def finish_search(out: str, base: dict[str, Any], grid, wall_seconds: float) -> dict[str, Any]:
    """Print the table (TuningCallback wrote it at the experiment's end); copy the best trial to DIR/best;
    write DIR/summary.json and return it. `grid` is what Tuner.fit() returned."""
    tune_cfg = base["tune"]
    metric, mode = tune_cfg["metric"], tune_cfg["mode"]
    url = join(out, RESULTS_FILE)
    trials = read_results(url)
    finished = int(trials["status"].isin(STATUSES_FINISHED).sum()) if len(trials) else 0
    interrupted = finished < len(trials) or (len(trials) < int(tune_cfg["num_samples"])
                                             and not _budget_spent(tune_cfg["time_budget_s"], wall_seconds))
    print(f"\n{len(trials)} trials ({finished} finished) -> {url}")
    if len(trials):
        print(format_results(trials, metric, mode))
    summary: dict[str, Any] = {"out": out, "search": base["hparams_search"].get("name"), "num_trials": len(trials),
                               "finished": finished, "interrupted": bool(interrupted), "metric": metric,
                               "mode": mode, "wall_seconds": round(wall_seconds, 1), "best": None}
    candidates = _candidates(trials, metric)
    if candidates.empty:
        _write_summary(out, summary)
        if not interrupted:
            errors = list(trials.loc[trials["status"] == "error", "trial_id"]) if len(trials) else []
            raise DermaidError(f"no trial reported {metric}" + (f"; trials {errors} failed (their errors are in "
                                                              f"{join(out, TUNE_DIR_NAME)})" if errors else ""))
        return summary
    best = _best_trial(grid, candidates, metric, mode)
    worst = best_row(candidates, metric, "min" if mode == "max" else "max")
    best_url = copy_checkpoint(join(best["run_dir"], BEST_DIR), join(out, BEST_DIR))
    overrides = format_overrides(best, hyperparameter_keys(trials))
    summary["best"] = {"trial_id": best["trial_id"], metric: best[metric], "epoch": _card_epoch(best_url),
                       "checkpoint": best_url, "trial_dir": best["run_dir"], "overrides": overrides}
    summary["worst"] = {"trial_id": worst["trial_id"], metric: worst[metric]}
    _write_summary(out, summary)
    print(f"\nbest trial {best['trial_id']}: {metric} {best[metric]:.4f} (worst {worst[metric]:.4f})  {overrides}")
    print(f"best checkpoint: {best_url}   (dermaid evaluate checkpoint={best_url} ...)")
    print(DISCLAIMER)
    return summary


def _candidates(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials that may be the best: finished without error, reported the metric, left a best checkpoint."""
    from dermaid.models.card import CARD_FILE

    if trials.empty or metric not in trials:
        return trials.iloc[0:0]
    keep = trials["status"].isin(("completed", "stopped")) & trials[metric].notna()
    keep &= trials["run_dir"].map(lambda run_dir: exists(join(run_dir, BEST_DIR, CARD_FILE)))
    return trials[keep]


def _best_trial(grid, candidates: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    """Tune's best result when it is a candidate, else the best candidate in the table."""
    try:
        best_id = grid.get_best_result(metric=metric, mode=mode, scope="all").metrics.get("trial_id")
    except RuntimeError:  # Tune found no trial that reported the metric
        best_id = None
    chosen = candidates[candidates["trial_id"] == best_id]
    return chosen.iloc[0] if len(chosen) else best_row(candidates, metric, mode)


def _card_epoch(url: str) -> int | None:
    from dermaid.models.card import load_card

    return load_card(url).epoch


def _budget_spent(budget_s: float | None, wall_seconds: float) -> bool:
    return bool(budget_s) and wall_seconds >= float(budget_s) * BUDGET_SPENT_FRACTION


def _write_summary(out: str, summary: dict[str, Any]) -> None:
    from dermaid.evaluation.metrics import json_safe

    write_text(join(out, SUMMARY_FILE), json.dumps(json_safe(summary), indent=2, default=str))


def copy_checkpoint(src: str, dst: str) -> str:
    """Copy a checkpoint directory (card + artifact) to dst the way every checkpoint is written (save_checkpoint:
    atomic, replaced in place on object stores); returns dst."""
    from dermaid.models.card import load_card, save_checkpoint

    card = load_card(src)
    return save_checkpoint(dst, card, artifact_bytes=read_bytes(join(src, card.artifact)))
