"""Hyperparameter search with Ray Tune over the `dermaid train` trainer.

    dermaid tune hparams_search=toy                         # 4 trials on the toy set (runs/tune/toy)
    dermaid tune hparams_search=toy resume=true             # continue an interrupted search in the same out=
    dermaid tune hparams_search=isic_effnet tune=optuna scaling=gpu1 data.root=gs://bucket/isic2019

Shape (the Tune + Train pattern of Ray 2.x, Train V2): `Tuner(train_driver_fn, param_space=...)` runs
one *driver function* per trial; it applies the sampled values to the composed train config and calls
the same `train()` as `dermaid train`, so each trial is itself a distributed TorchTrainer run.
`TuneReportCallback` forwards every epoch's metrics to Tune, where ASHA compares trials and stops weak
ones (their actors, and so their workers, are freed).

    space.py        hparams_search.space -> Tune samplers, checked before any trial; one trial's config
    tune_config.py  the `tune` group -> TuneConfig (ASHA / FIFO, random / Optuna, samples, budget)
    driver.py       `dermaid tune` (run, tune), the per-trial driver function, the Tuner
    callbacks.py    the Tune callback: live results table, trials.log, placement groups of stopped trials
    results.py      DIR/results.csv: one row per trial, read through `read_results`
    summary.py      the end of a search: best trial (Tune's ResultGrid), DIR/best, DIR/summary.json
    layout.py       the file names of an out= directory

out=DIR holds:
    DIR/results.csv       one row per trial: status, epochs, best metrics, `config/<key>` columns
    DIR/best/             the best trial's best checkpoint + model card (for `dermaid evaluate` / `serve`)
    DIR/summary.json      best trial, its overrides and metrics; DIR/trials.log (trial start/end events)
    DIR/trials/<id>/      each trial's `dermaid train` run directory (best/, last/, history.csv, ...)
    DIR/tune/             Ray Tune's experiment state (what resume=true restores)
    DIR/tune_config.yaml  the resolved base config (a resumed search uses it, not new overrides)
Decision support for research only; never a diagnosis.
"""

from __future__ import annotations

from typing import Any

from dermaid.tuning.driver import run, train_driver_fn, tune
from dermaid.tuning.layout import CONFIG_PREFIX, RESULTS_FILE, TRIALS_LOG
from dermaid.tuning.space import build_search_space
from dermaid.tuning.tune_config import build_tune_config

__all__ = ["CONFIG_PREFIX", "RESULTS_FILE", "TRIALS_LOG", "build_search_space", "build_tune_config", "run",
           "train_driver_fn", "tune"]


def __getattr__(name: str) -> Any:
    # A search started before dermaid.tuning became a package saved its callback as dermaid.tuning.TuningCallback
    # in Tune's experiment state; resume=true unpickles it by that name (imported lazily: it needs Ray).
    if name == "TuningCallback":
        from dermaid.tuning.callbacks import TuningCallback

        return TuningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
