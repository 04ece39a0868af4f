"""Cross-validation: every fold of the prepared split trained as its own `dermaid train` run, out-of-fold predictions,
their metrics, a summary table, and the fold models as one ensemble compared with each fold on the test part.

    dermaid cv experiment=toy                                   # K folds (data.folds, 5 by default) -> runs/cv/toy
    dermaid cv experiment=toy out=runs/cv/toy                   # run again: finished folds are skipped
    dermaid cv experiment=toy cv.folds=[0,1]                    # only these folds now (the rest on a later run)
    dermaid cv data.root=gs://bucket/isic2019 out=gs://bucket/cv/b3 scaling=gpu1 cv.max_concurrent=5 ray.address=auto

Each fold is a Ray Tune trial of a grid over the fold (the Tune+Train pattern `dermaid tune` uses): the trial's
function builds the same TorchTrainer as `dermaid train` (one placement group per fold, from the `scaling` group),
in DIR/fold-K/, then predicts that fold's validation part (its out-of-fold predictions) and the held-out test part
with the fold's best checkpoint through `dermaid evaluate` (DIR/fold-K/oof/, DIR/fold-K/test/). cv.max_concurrent
folds run at once: on a cluster, as many as it holds (Tune places them on any node); 1 here. With
scaling.num_workers=0 (Ray Train's local mode) the folds train in this process one after another and no Ray starts.

A fold is finished when its summary.json and its predictions exist; a rerun on the same out= skips finished folds
and resumes an interrupted one from its last Ray Train checkpoint. The rerun must ask for the same thing: the same
dataset version (a fold trained on another version is refused, as is any other change of model, train, optim,
augment or seed; the keys named), so a CV never mixes folds.

When every fold is finished, DIR holds:
    oof_predictions.csv   every training image once (the ISIC submission format: image,MEL,...,UNK)
    oof_metrics.json      OOF balanced accuracy with its bootstrap 95% interval, per-class sensitivity, specificity, AUC
    cv_summary.csv        one row per fold (images, best epoch, temperature, balanced accuracy with interval, AUC, test
                          balanced accuracy) and the pooled OOF row
    ensemble/             the fold models as one checkpoint (dermaid.models.ensemble; cv.ensemble=true)
    test_comparison.csv   each fold and the ensemble on the held-out test part (balanced accuracy with interval, AUC)
    summary.json          all of the above in one file
The ensemble's test predictions are the mean of the folds' (what the ensemble checkpoint computes: `dermaid evaluate
checkpoint=DIR/ensemble split=test` gives the same, tests/test_cv.py checks it). Decision support, never a diagnosis.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dermaid.classes import CLASS_CODES, DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, join, read_text, write_text

CV_CONFIG_FILE = "cv_config.yaml"     # the resolved base config every fold starts from (what a rerun must match)
TUNE_DIR_NAME = "tune"                # Ray Tune's experiment state: DIR/tune/
ENSEMBLE_DIR = "ensemble"
TRIAL_FILE = "cv_trial.json"          # inside each fold's run directory: the node and times of its trial
OOF_DIR, TEST_DIR = "oof", "test"     # inside each fold's run directory
# what a rerun must ask for unchanged (scaling, ray, run, logger and cv may change: where and how fast, not what)
COMPARED_KEYS = ("seed", "model", "train", "optim", "augment")


def fold_dir(out: str, fold: int) -> str:
    return join(out, f"fold-{int(fold)}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid cv experiment=NAME [out=DIR] [cv.folds=[...]] ...`: train the folds, print the tables."""
    summary = cross_validate(cfg)
    print(f"\ncross-validation: {summary['out']} ({summary['finished']} of {summary['num_folds']} folds finished)")
    if summary.get("cv_table") is not None:
        print(summary["cv_table"])
    if summary.get("oof"):
        oof = summary["oof"]
        print(f"out-of-fold balanced accuracy {oof['balanced_accuracy']:.3f} "
              f"(95% CI {oof['balanced_accuracy_ci'][0]:.3f}-{oof['balanced_accuracy_ci'][1]:.3f}), "
              f"{oof['num_samples']} images")
    if summary.get("test_table") is not None:
        print("\nheld-out test part:")
        print(summary["test_table"])
    if summary["finished"] < summary["num_folds"]:
        print(f"folds still to train: {summary['pending']}; run again with out={summary['out']} to finish")
    print(DISCLAIMER)
    return {k: v for k, v in summary.items() if not k.endswith("_table")}


def cross_validate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Check the inputs, train the folds not finished yet (Tune grid over the fold), then collect; returns the summary."""
    from dermaid.data.prepare import check_raw_roots
    from dermaid.training.worker_config import TrainConfig

    started = time.time()
    plain = to_plain(cfg)
    settings = TrainConfig.parse(plain)  # a wrong or missing train key fails here, with its name
    cv = _cv_settings(plain["cv"])
    out = absolute_url(str(plain["out"]))
    check_raw_roots(settings.data)
    base = _prepare_base(plain, out)  # the dataset version resolved (or prepared) once, here
    num_folds = int(base["num_folds"])
    requested = _requested_folds(cv["folds"], num_folds)
    _check_previous(out, base)
    write_text(join(out, CV_CONFIG_FILE), OmegaConf.to_yaml(OmegaConf.create(base)))
    pending = [k for k in requested if not fold_finished(out, k, base["has_test"])]
    skipped = [k for k in requested if k not in pending]
    if skipped:
        print(f"folds already finished, skipped: {skipped}")
    if pending:
        _run_folds(base, pending, cv, settings)
    summary = collect(out, base, cv)
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["skipped"] = skipped
    write_text(join(out, "summary.json"), json.dumps(_json(summary), indent=2))
    return summary


# ---------------------------------------------------------------------------------------------
# Inputs


def _cv_settings(section: dict[str, Any]) -> dict[str, Any]:
    expected = {"folds", "max_concurrent", "trial_cpus", "worker_start_timeout_s", "tta", "device", "batch_size",
                "bootstrap", "ensemble"}
    missing, unknown = sorted(expected - set(section)), sorted(set(section) - expected)
    if missing or unknown:
        raise DermaidError(f"cv config: missing keys {['cv.' + k for k in missing]}, unknown keys "
                           f"{['cv.' + k for k in unknown]}")
    if int(section["max_concurrent"]) < 1:
        raise DermaidError(f"cv.max_concurrent={section['max_concurrent']}: at least 1 fold at a time")
    return dict(section)


def _requested_folds(folds: Any, num_folds: int) -> list[int]:
    if folds is None:
        return list(range(num_folds))
    chosen = [folds] if isinstance(folds, int) else list(folds)
    wrong = [f for f in chosen if not isinstance(f, int) or not 0 <= f < num_folds]
    if wrong or not chosen:
        raise DermaidError(f"cv.folds={chosen}: folds are 0..{num_folds - 1} in this dataset version")
    return sorted(set(chosen))


def _prepare_base(plain: dict[str, Any], out: str) -> dict[str, Any]:
    """The resolved config every fold starts from (training.driver.prepared_base), with the folds the version has."""
    from dermaid.data.loading import read_manifest
    from dermaid.training.driver import prepared_base

    base, version_url = prepared_base(plain, out)
    manifest = read_manifest(version_url)
    base["version_url"] = absolute_url(version_url)
    base["num_folds"] = int(manifest["settings"]["folds"])
    base["has_test"] = int(manifest.get("counts", {}).get("fold", {}).get("-1", 0)) > 0
    if base["logger"]["name"] == "wandb" and not base["logger"].get("group"):
        base["logger"]["group"] = f"cv-{os.path.basename(out.rstrip('/'))}"
    return base


def _check_previous(out: str, base: dict[str, Any]) -> None:
    """A rerun on an out= that holds folds must ask for the same dataset version and the same training."""
    url = join(out, CV_CONFIG_FILE)
    if not exists(url):
        return
    before = OmegaConf.to_container(OmegaConf.create(read_text(url)), resolve=False)
    version, asked = before.get("data", {}).get("version"), base["data"]["version"]
    if version != asked:
        raise DermaidError(f"out={out} holds folds trained on dataset version {version}, not {asked} (the version "
                           f"data.version / data.root give now): choose another out=, or data.version={version}")
    changed = [f"{key}: {_flat_difference(before.get(key), base.get(key), key)}" for key in COMPARED_KEYS
               if before.get(key) != base.get(key)]
    if changed:
        raise DermaidError(f"out={out} holds folds trained with other settings ({'; '.join(changed)}); a CV's folds "
                           "must be trained alike: choose another out= or the same settings")


def _flat_difference(before: Any, now: Any, prefix: str) -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        return ", ".join(f"{prefix}.{k}={before.get(k)!r} before, {now.get(k)!r} now" for k in keys)
    return f"{before!r} before, {now!r} now"


def fold_finished(out: str, fold: int, has_test: bool) -> bool:
    """Trained (summary.json) and predicted (its OOF part and, when the version has one, the test part)."""
    run_dir = fold_dir(out, fold)
    needed = ["summary.json", f"{OOF_DIR}/metrics.json"] + ([f"{TEST_DIR}/metrics.json"] if has_test else [])
    return all(exists(join(run_dir, name)) for name in needed)


# ---------------------------------------------------------------------------------------------
# Training the folds: a Tune grid over the fold, one Tune+Train trial per fold


def _run_folds(base: dict[str, Any], folds: list[int], cv: dict[str, Any], settings) -> None:
    import ray.tune

    from dermaid.processes import sigint_handler_kept
    from dermaid.ray_runtime import ensure_ray
    from dermaid.training.driver import _user_error, check_shared_storage

    if settings.scaling.num_workers == 0:  # Ray Train's local mode: each fold in this process, no Ray at all
        print(f"training folds {folds} in this process, one after another (scaling.num_workers=0)")
        for fold in folds:
            run_fold(base, fold)
        return
    ensure_ray(settings.ray.address, settings.ray.num_cpus, log_to_driver=True)
    check_shared_storage({"out": base["out"], "data.prepared_dir": base["version_url"]}, settings.run.shared_storage)
    print(f"training folds {folds} ({min(len(folds), int(cv['max_concurrent']))} at a time)")
    trainable = ray.tune.with_resources(ray.tune.with_parameters(fold_driver_fn, base=base),
                                        {"CPU": float(cv["trial_cpus"])})
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"fold": ray.tune.grid_search(folds)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=int(cv["max_concurrent"])),
        run_config=ray.tune.RunConfig(name=TUNE_DIR_NAME, storage_path=base["out"], verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    with sigint_handler_kept():
        grid = tuner.fit()
    failed = []
    for result in grid:
        if result.error is not None:
            fold = (result.config or {}).get("fold")
            failed.append(f"fold {fold}: {_user_error(result.error) or _last_line(result.error)}")
    if failed:
        raise DermaidError("cross-validation: " + "; ".join(failed) + f" (finished folds are kept in {base['out']}; "
                           "run again to retry the others)")


def _last_line(error: BaseException) -> str:
    """The final line of a trial's error (Ray wraps the traceback into the message); the whole one is in DIR/tune."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__) + " (full traceback under DIR/tune/)"


def fold_driver_fn(config: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune trainable: train fold `config["fold"]` (unless its summary.json exists), then predict its
    validation part (out-of-fold) and the test part with its best checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from dermaid.ray_compat import train_worker_start_timeout_env

    for key, value in train_worker_start_timeout_env(base["cv"]["worker_start_timeout_s"]).items():
        os.environ.setdefault(key, value)
    run_fold(base, int(config["fold"]), callbacks=[TuneReportCallback()])


def run_fold(base: dict[str, Any], fold: int, callbacks: list | None = None) -> None:
    """Train one fold (unless its summary.json exists), predict its OOF and test parts, record where it ran."""
    from dermaid.training.driver import train

    plain = fold_config(base, fold)
    started = time.time()
    if not exists(join(plain["out"], "summary.json")):
        train(plain, callbacks=callbacks)
    predict_fold(base, fold)
    _record_trial(plain["out"], started)


def _record_trial(run_dir: str, started: float) -> None:
    """DIR/fold-K/cv_trial.json: where and when the fold's trial ran (provenance; the multi-node test reads it)."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # None: local mode, no Ray
    write_text(join(run_dir, TRIAL_FILE), json.dumps({"node_id": node, "started": started, "finished": time.time()},
                                                     indent=2))


def fold_config(base: dict[str, Any], fold: int) -> dict[str, Any]:
    """The `dermaid train` config of one fold: the base with data.fold and its own run directory."""
    plain = json.loads(json.dumps({k: v for k, v in base.items() if k not in ("version_url", "num_folds", "has_test")}))
    plain["data"]["fold"] = int(fold)
    plain["out"] = fold_dir(base["out"], fold)
    return plain


def predict_fold(base: dict[str, Any], fold: int) -> None:
    """`dermaid evaluate` of the fold's best checkpoint on its validation part (DIR/fold-K/oof/) and, when the
    version has one, on the test part (DIR/fold-K/test/): the one prediction path, calibrated with the fold's T."""
    from dermaid.evaluation.evaluate import evaluate

    run_dir, cv = fold_dir(base["out"], fold), base["cv"]
    splits = [("val", OOF_DIR)] + ([("test", TEST_DIR)] if base["has_test"] else [])
    for split, name in splits:
        if exists(join(run_dir, name, "metrics.json")):
            continue
        evaluate({"checkpoint": join(run_dir, "best"), "split": split, "tta": int(cv["tta"]), "calibrated": True,
                  "device": str(cv["device"]), "batch_size": int(cv["batch_size"]), "out": join(run_dir, name),
                  "ood": None, "data": {**base["data"], "fold": int(fold)}})


# ---------------------------------------------------------------------------------------------
# Collecting: OOF predictions and metrics, the summary table, the ensemble and the test comparison


def collect(out: str, base: dict[str, Any], cv: dict[str, Any]) -> dict[str, Any]:
    """The CV's outputs from the finished folds (OOF, ensemble and test comparison only when all are finished)."""
    num_folds = int(base["num_folds"])
    finished = [k for k in range(num_folds) if fold_finished(out, k, base["has_test"])]
    summary: dict[str, Any] = {"out": out, "dataset_version": base["data"]["version"], "num_folds": num_folds,
                               "finished": len(finished), "pending": [k for k in range(num_folds) if k not in finished],
                               "model": base["model"]["name"]}
    if not finished:
        return summary
    records = _load_labels(base["version_url"])
    labels = records.set_index("image_id")["label_idx"]
    rows = [_fold_row(out, k, labels, cv) for k in finished]
    complete = len(finished) == num_folds
    if complete:
        oof = write_oof(out, base, records, cv)
        summary["oof"] = oof
        rows.append({"fold": "oof", "images": oof["num_samples"], "balanced_accuracy": oof["balanced_accuracy"],
                     "ba_low": oof["balanced_accuracy_ci"][0], "ba_high": oof["balanced_accuracy_ci"][1],
                     "auc_macro": oof["auc_macro"]})
    table = pd.DataFrame(rows)
    table["best_epoch"] = table["best_epoch"].astype("Int64")  # the OOF row has none: still whole numbers
    write_text(join(out, "cv_summary.csv"), table.to_csv(index=False, lineterminator="\n"))
    summary["folds"] = rows
    summary["cv_table"] = _format_table(table)
    if complete and base["has_test"]:
        summary["test"] = compare_on_test(out, num_folds, labels, cv)
        summary["test_table"] = _format_table(pd.DataFrame(summary["test"]["rows"]))
    if complete and cv["ensemble"]:
        summary["ensemble"] = _build_fold_ensemble(out, num_folds, summary)
    return summary


def _format_table(table: pd.DataFrame) -> str:
    if "best_epoch" in table:  # the OOF row has none: blank, not <NA>
        table = table.assign(best_epoch=table["best_epoch"].astype(object).where(table["best_epoch"].notna(), ""))
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="")


def _load_labels(version_url: str) -> pd.DataFrame:
    """image_id, fold and label_idx (-1: unlabelled) of every image of the CV's dataset version (no image bytes)."""
    from dermaid.data.loading import load_records

    return load_records(version_url, split="all", with_images=False, columns=["image_id", "fold", "label_idx"])


def _read_predictions(eval_dir: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(read_text(join(eval_dir, "predictions.csv"))))


def _labelled(frame: pd.DataFrame, labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 8), class indices (N,)) of a predictions.csv's labelled images."""
    y = labels.reindex(frame["image"].tolist()).fillna(-1).astype(int).to_numpy()  # (N,)
    keep = y >= 0
    return frame[list(CLASS_CODES)].to_numpy(dtype=np.float64)[keep], y[keep]


def _fold_row(out: str, fold: int, labels: pd.Series, cv: dict[str, Any]) -> dict[str, Any]:
    """One fold's line: its out-of-fold part's metrics (with the interval) and its training."""
    from dermaid.evaluation.metrics import bootstrap_interval

    run_dir = fold_dir(out, fold)
    train_summary = json.loads(read_text(join(run_dir, "summary.json")))
    probs, y = _labelled(_read_predictions(join(run_dir, OOF_DIR)), labels)
    metrics = json.loads(read_text(join(run_dir, OOF_DIR, "metrics.json")))
    low, high = bootstrap_interval(y, probs, n_resamples=int(cv["bootstrap"]))
    row = {"fold": str(fold), "images": int(len(y)), "best_epoch": train_summary.get("best_epoch"),
           "temperature": train_summary.get("temperature"), "balanced_accuracy": metrics.get("balanced_accuracy"),
           "ba_low": low, "ba_high": high, "auc_macro": metrics.get("auc_macro"),
           "train_seconds": train_summary.get("wall_seconds")}
    if exists(join(run_dir, TEST_DIR, "metrics.json")):
        row["test_balanced_accuracy"] = json.loads(read_text(join(run_dir, TEST_DIR, "metrics.json"))).get(
            "balanced_accuracy")
    return row


def write_oof(out: str, base: dict[str, Any], records: pd.DataFrame, cv: dict[str, Any]) -> dict[str, Any]:
    """DIR/oof_predictions.csv (every training image exactly once, checked) and DIR/oof_metrics.json."""
    from dermaid.evaluation.evaluate import submission_csv
    from dermaid.evaluation.metrics import bootstrap_interval, compute_metrics, json_safe

    training = set(records.loc[records["fold"] >= 0, "image_id"])
    frame = pd.concat([_read_predictions(join(fold_dir(out, k), OOF_DIR)) for k in range(int(base["num_folds"]))],
                      ignore_index=True)
    repeated = frame["image"][frame["image"].duplicated()].tolist()
    missing, extra = sorted(training - set(frame["image"])), sorted(set(frame["image"]) - training)
    if repeated or missing or extra:
        raise DermaidError(f"{out}: the folds' out-of-fold predictions do not cover the training images once each "
                           f"(repeated {repeated[:5]}, missing {missing[:5]}, not training images {extra[:5]}); "
                           "remove those folds' oof/ directories and run again")
    frame = frame.sort_values("image", kind="stable").reset_index(drop=True)
    write_text(join(out, "oof_predictions.csv"), submission_csv(
        frame["image"].tolist(), frame[list(CLASS_CODES)].to_numpy(dtype=np.float64), frame["UNK"].to_numpy()))
    probs, y = _labelled(frame, records.set_index("image_id")["label_idx"])
    metrics = compute_metrics(y, probs)
    metrics["balanced_accuracy_ci"] = list(bootstrap_interval(y, probs, n_resamples=int(cv["bootstrap"])))
    metrics.update({"num_images": int(len(frame)), "dataset_version": base["data"]["version"],
                    "folds": int(base["num_folds"]), "tta": int(cv["tta"]), "disclaimer": DISCLAIMER})
    write_text(join(out, "oof_metrics.json"), json.dumps(json_safe(metrics), indent=2))
    return metrics


def compare_on_test(out: str, num_folds: int, labels: pd.Series, cv: dict[str, Any]) -> dict[str, Any]:
    """Each fold and the ensemble (the mean of the folds' calibrated test probabilities) on the test part:
    DIR/test_comparison.csv and DIR/ensemble_test_predictions.csv."""
    from dermaid.evaluation.evaluate import submission_csv
    from dermaid.evaluation.metrics import bootstrap_interval, compute_metrics

    frames = [_read_predictions(join(fold_dir(out, k), TEST_DIR)) for k in range(num_folds)]
    images = frames[0]["image"].tolist()
    if any(f["image"].tolist() != images for f in frames[1:]):
        raise DermaidError(f"{out}: the folds' test predictions cover different images; remove the folds' test/ "
                           "directories and run again")
    members = [f[list(CLASS_CODES)].to_numpy(dtype=np.float64) for f in frames]  # K x (N, 8)
    ensemble = np.mean(members, axis=0)  # (N, 8): what the ensemble checkpoint computes
    write_text(join(out, "ensemble_test_predictions.csv"), submission_csv(images, ensemble))
    rows = []
    for name, probs in [*((f"fold-{k}", p) for k, p in enumerate(members)), ("ensemble", ensemble)]:
        p, y = _labelled(pd.DataFrame({"image": images, **dict(zip(CLASS_CODES, probs.T))}), labels)
        metrics = compute_metrics(y, p)
        low, high = bootstrap_interval(y, p, n_resamples=int(cv["bootstrap"]))
        rows.append({"model": name, "images": int(len(y)), "balanced_accuracy": metrics["balanced_accuracy"],
                     "ba_low": low, "ba_high": high, "auc_macro": metrics["auc_macro"]})
    write_text(join(out, "test_comparison.csv"), pd.DataFrame(rows).to_csv(index=False, lineterminator="\n"))
    best = max(rows[:-1], key=lambda r: r["balanced_accuracy"])
    return {"rows": rows, "best_fold": best["model"], "tta": int(cv["tta"]),
            "ensemble_minus_best_fold": rows[-1]["balanced_accuracy"] - best["balanced_accuracy"]}


def _build_fold_ensemble(out: str, num_folds: int, summary: dict[str, Any]) -> str:
    """DIR/ensemble from the folds' best checkpoints; its card carries the OOF and test figures."""
    from dermaid.evaluation.metrics import json_safe
    from dermaid.models.ensemble import build_ensemble

    oof = summary.get("oof") or {}
    metrics = {"cv_oof": {key: oof.get(key) for key in ("balanced_accuracy", "balanced_accuracy_ci", "auc_macro",
                                                         "num_samples")}}
    if summary.get("test"):
        metrics["test"] = {k: v for k, v in summary["test"]["rows"][-1].items() if k != "model"}
    url = join(out, ENSEMBLE_DIR)
    build_ensemble([join(fold_dir(out, k), "best") for k in range(num_folds)], url, overwrite=True,
                   metrics=json_safe(metrics))
    return url


def _json(value: Any) -> Any:
    from dermaid.evaluation.metrics import json_safe

    return json_safe({k: v for k, v in value.items() if not k.endswith("_table")})
