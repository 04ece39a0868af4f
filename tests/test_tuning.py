"""dermaid.tuning: search-space checks, the results table and the choice of the best trial (no Ray), and one
real tiny search that is interrupted and resumed.

The real search (2 trials x 1 epoch on the session's Ray, toy data at 64 px) runs in a subprocess
joined to the session cluster; it is stopped with SIGINT (Ctrl-C) once the results table shows a
finished trial, then resumed in this process with resume=true. The module fixture does this once;
the tests check the table, DIR/best, `dermaid evaluate` on it, W&B runs and the resume semantics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError
from dermaid.tuning import RESULTS_FILE, TRIALS_LOG, build_search_space, build_tune_config, tune

METRIC = "val/balanced_accuracy"


def _base(tmp_path: Path, **extra) -> dict:
    plain = to_plain(compose("tune", ["hparams_search=toy", f"out={tmp_path / 'tune'}"]))
    plain.update(extra)
    return plain


# ---------------------------------------------------------------------------------------------
# The search space: mapped to Tune, and checked before anything starts


def test_search_configs_compose_and_map_to_tune(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    for name in ("toy", "isic_effnet"):
        plain = to_plain(compose("tune", [f"hparams_search={name}", "tune=optuna"]))
        space, groups = build_search_space(plain["hparams_search"], plain)
        assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower > 0
        assert isinstance(space["augment"], Categorical) and set(groups["augment"]) == set(space["augment"].categories)
        assert plain["tune"]["search_alg"]["name"] == "optuna" and plain["tune"]["scheduler"]["name"] == "asha"
        config = build_tune_config(plain["tune"], space, max_t=plain["train"]["epochs"])
        assert config.metric == METRIC and config.mode == "max"
        assert config.max_concurrent_trials == plain["tune"]["max_concurrent_trials"]  # a ConcurrencyLimiter
    toy = to_plain(compose("tune", ["hparams_search=toy"]))
    toy_experiment = to_plain(compose("train", ["experiment=toy"]))
    assert toy["model"] == toy_experiment["model"] and toy["tune"]["num_samples"] == 4  # the toy experiment
    assert build_tune_config(toy["tune"], {}, max_t=4).scheduler.__class__.__name__ == "AsyncHyperBandScheduler"


@pytest.mark.parametrize("space, key, words", [
    ({"model.name": {"choice": ["resnet10t", "resnet_nonexistent_9"]}}, "model.name", ["unknown backbone",
                                                                                        "resnet_nonexistent_9"]),
    ({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}, "optim.lrr", ["unknown key"]),
    ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, "optim.lr", ["empty range"]),
    ({"optim.weight_decay": {"uniform": [0.1, 0.1]}}, "optim.weight_decay", ["empty range"]),
    ({"augment": {"choice": []}}, "augment", ["empty choice"]),
    ({"augment": {"choice": ["light", "heavy"]}}, "augment", ["unknown augment option", "heavy"]),
    ({"model": {"choice": ["toy", "resnet18"]}, "optim.lr": {"gaussian": [0, 1]}}, "optim.lr", ["unknown sampler"]),
    ({"train.batch_size": {"randint": [64, 16]}}, "train.batch_size", ["empty range"]),
])
def test_bad_search_space_fails_before_any_trial(tmp_path, space, key, words):
    plain = _base(tmp_path)
    plain["hparams_search"]["space"] = space
    plain["data"]["root"] = str(tmp_path / "no-such-data")  # nothing is prepared or started before the check
    with pytest.raises(DermaidError) as err:
        tune(plain)
    message = str(err.value)
    assert f"hparams_search.space.{key}" in message and all(w in message for w in words), message
    assert not (tmp_path / "tune").exists()


# ---------------------------------------------------------------------------------------------
# The results table and the choice of the best trial (no Ray)


def _trial_histories(out: str, metrics: dict[str, list[float]]) -> None:
    from dermaid.training.history import write_history
    from dermaid.tuning.layout import trial_run_dir

    for trial_id, values in metrics.items():
        write_history(trial_run_dir(out, trial_id), [{"epoch": epoch, METRIC: value, "val/loss": 1 - value,
                                                      "seconds": 1.5} for epoch, value in enumerate(values, 1)])


def test_results_table_takes_each_trials_best_epoch_by_mode_and_reads_back(tmp_path):
    from dermaid.tuning.results import best_row, format_overrides, read_results, trial_row, write_results

    out = str(tmp_path)
    _trial_histories(out, {"a": [0.2, 0.5, 0.4], "b": [0.3, 0.6, 0.1]})
    rows = {mode: [trial_row(out, trial_id, "end", "TERMINATED", {"optim.lr": lr}, METRIC, mode, ["optim.lr"])
                   for trial_id, lr in (("a", 0.01), ("b", 0.002))] for mode in ("max", "min")}
    assert [(r[METRIC], r["best_epoch"], r["epochs"], r["status"]) for r in rows["max"]] == [
        (0.5, 2, 3, "stopped"), (0.6, 2, 3, "stopped")]  # no summary.json: Tune stopped them
    assert [(r[METRIC], r["best_epoch"]) for r in rows["min"]] == [(0.2, 1), (0.1, 3)]
    assert rows["max"][0]["val/loss"] == pytest.approx(0.5) and rows["max"][0]["seconds"] == 4.5

    table = read_results(write_results(out, rows["max"]))
    assert list(table["trial_id"]) == ["a", "b"] and table.attrs["url"].endswith(RESULTS_FILE)
    assert best_row(table, METRIC, "max")["trial_id"] == "b" and best_row(table, METRIC, "min")["trial_id"] == "a"
    assert format_overrides(best_row(table, METRIC, "max"), ["config/optim.lr"]) == "optim.lr=0.002"
    assert read_results(str(tmp_path / "none.csv")).empty
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DermaidError, match="not a readable CSV"):
        read_results(str(tmp_path / "bad.csv"))


@pytest.mark.parametrize("tune_pick, expected", [("b", "b"), ("a", "a"), ("errored", "b"), (None, "b")])
def test_best_trial_is_tunes_pick_when_it_finished(tune_pick, expected):
    from types import SimpleNamespace

    from dermaid.tuning.summary import _best_trial

    class Grid:  # the part of Ray Tune's ResultGrid the summary uses
        def get_best_result(self, metric, mode, scope):
            assert (metric, mode, scope) == (METRIC, "max", "all")
            if tune_pick is None:
                raise RuntimeError("No best trial found")
            return SimpleNamespace(metrics={"trial_id": tune_pick})

    candidates = pd.DataFrame({"trial_id": ["a", "b"], METRIC: [0.4, 0.6]})  # finished, with checkpoints
    assert _best_trial(Grid(), candidates, METRIC, "max")["trial_id"] == expected


def test_cli_requires_a_search_space(tmp_path, dermaid_cli):
    proc = dermaid_cli("tune", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: hparams_search= is required" in proc.stderr and "toy" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# A real tiny search: interrupted after its first trial, then resumed


_DRIVER = """
import json, sys
from dermaid.tuning import tune
tune(json.load(open(sys.argv[1])))
"""


def _tiny_search(toy_prepared: str, out: Path, ray_address: str) -> dict:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    plain = to_plain(compose("tune", [
        "hparams_search=toy", f"out={out}", f"data.prepared_dir={prepared_dir}", f"data.version={version}",
        "train.epochs=1", "train.image_size=64", "train.batch_size=16", "tune.num_samples=2",
        "tune.time_budget_s=null", "logger=wandb", "logger.mode=offline", f"ray.address={ray_address}",
    ]))
    plain["hparams_search"]["space"] = {
        "optim.lr": {"loguniform": [1e-3, 1e-2]},
        "augment": {"choice": ["none", "light"]},
    }
    return plain


def _finished_rows(out: Path) -> pd.DataFrame:
    url = out / RESULTS_FILE
    if not url.exists():
        return pd.DataFrame()
    table = pd.read_csv(url)
    return table[table["status"].isin(["completed", "stopped"])]


@pytest.fixture(scope="module")
def resumed_search(ray_session, toy_prepared, tmp_path_factory):
    """(out dir, the resumed summary, trial ids finished before the interrupt, their history bytes)."""
    import ray

    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "toy"
    plain = _tiny_search(toy_prepared, out, ray.get_runtime_context().gcs_address)
    config_file = tmp / "config.json"
    config_file.write_text(json.dumps(plain))
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    log = open(tmp / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp)
    try:
        deadline = time.time() + 420
        while _finished_rows(out).empty:
            assert proc.poll() is None, (tmp / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time:\n" + (tmp / "driver.log").read_text()[-3000:]
            time.sleep(2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    done_before = _finished_rows(out)
    histories = {tid: (out / "trials" / tid / "history.csv").read_bytes() for tid in done_before["trial_id"]}
    summary = tune({**plain, "resume": True})
    return out, summary, list(done_before["trial_id"]), histories


def test_tuning_writes_results_and_a_best_checkpoint_that_evaluate_accepts(resumed_search, toy_prepared, tmp_path):
    import ray

    from dermaid.evaluation.evaluate import evaluate
    from dermaid.models.card import load_card

    out, summary, _, _ = resumed_search
    table = pd.read_csv(out / RESULTS_FILE)
    assert len(table) == 2 and set(table["status"]) == {"completed"}, table.to_string()
    assert table[METRIC].between(0, 1).all() and (table["epochs"] == 1).all()
    assert {"config/optim.lr", "config/augment"} <= set(table.columns)
    assert table["config/optim.lr"].between(1e-3, 1e-2).all()

    best = table.loc[table[METRIC].idxmax()]
    assert summary["best"]["trial_id"] == best["trial_id"] and not summary["interrupted"]
    card = load_card(str(out / "best"))
    assert card.config["optim"]["lr"] == pytest.approx(best["config/optim.lr"], rel=1e-4)
    assert card.metrics[METRIC] == pytest.approx(best[METRIC], abs=1e-5)

    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    result = evaluate(compose("evaluate", [f"checkpoint={out / 'best'}", f"data.prepared_dir={prepared_dir}",
                                           f"data.version={version}", f"out={tmp_path / 'eval'}"]))
    # same weights, same preprocessing: only float summation order differs from the trainer's validation
    assert result["metrics"]["balanced_accuracy"] == pytest.approx(best[METRIC], abs=0.05)
    assert (tmp_path / "eval" / "predictions.csv").exists()

    # W&B: each trial its own offline run, all in one group
    groups = set()
    for trial_id in table["trial_id"]:
        assert list((out / "trials" / trial_id / "wandb").glob("offline-run-*")), trial_id
        groups.add(json.dumps(load_card(str(out / "trials" / trial_id / "best")).config["logger"]["group"]))
    assert len(groups) == 1 and "tune-toy" in groups.pop()

    # stopped and finished trials gave their CPUs back
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < 2 - 1e-6 and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2)


def test_interrupted_search_resumes_without_repeating_finished_trials(resumed_search):
    out, summary, done_before, histories = resumed_search
    assert 1 <= len(done_before) < 2  # interrupted after the first trial finished
    log = (out / TRIALS_LOG).read_text().splitlines()
    for trial_id in done_before:
        starts = [line for line in log if line.endswith(f"start {trial_id}")]
        assert len(starts) == 1, log  # never started again
        assert (out / "trials" / trial_id / "history.csv").read_bytes() == histories[trial_id]
    table = pd.read_csv(out / RESULTS_FILE)
    assert set(done_before) < set(table["trial_id"]) and summary["finished"] == 2


def test_a_missing_data_root_is_said_before_ray_starts(tmp_path, monkeypatch):
    import dermaid.ray_runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before data.root was checked")

    monkeypatch.setattr(dermaid.ray_runtime, "ensure_ray", no_ray)
    cfg = compose("tune", ["hparams_search=toy", f"data.root={tmp_path}/nonexistent", f"out={tmp_path}/search"])
    with pytest.raises(DermaidError, match="raw data folder does not exist"):
        tune(cfg)
