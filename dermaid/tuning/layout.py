"""What a `dermaid tune` output directory (out=DIR) holds: one name per file, read and written by the
driver, the callbacks, the results table and the tuning report.

    DIR/results.csv       one row per trial (dermaid.tuning.results)
    DIR/best/             the best trial's best checkpoint + model card
    DIR/summary.json      best trial, its overrides and metrics
    DIR/trials.log        trial start/end/error events (dermaid.tuning.callbacks)
    DIR/trials/<id>/      each trial's `dermaid train` run directory
    DIR/tune/             Ray Tune's experiment state (what resume=true restores)
    DIR/tune_config.yaml  the resolved base config every trial starts from
"""

from __future__ import annotations

from dermaid.files import join

TUNE_DIR_NAME = "tune"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
BEST_DIR = "best"
TRIALS_LOG = "trials.log"
BASE_CONFIG_FILE = "tune_config.yaml"
CONFIG_PREFIX = "config/"  # results.csv hyperparameter columns (Ray's ResultGrid.get_dataframe() layout)


def trial_run_dir(out: str, trial_id: str) -> str:
    """The `dermaid train` run directory of one trial: DIR/trials/<trial_id>."""
    return join(out, TRIALS_DIR, trial_id)
