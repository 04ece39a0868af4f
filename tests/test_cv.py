"""`dermaid cv` (dermaid.training.cv) on a 2-fold toy version, 1 epoch per fold, on the session's Ray: the OOF
predictions cover every training image exactly once, their metrics and interval, a rerun skips the finished fold,
the fold ensemble equals `dermaid evaluate` of its checkpoint, and a rerun asking for another dataset version or
other training settings is refused before anything trains.

    flock /tmp/dermaid-ray.lock .venv/bin/python -m pytest tests/test_cv.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermaid.classes import CLASS_CODES, SUBMISSION_CODES
from dermaid.errors import DermaidError


@pytest.fixture(scope="module")
def two_fold_version(toy_raw, tmp_path_factory) -> tuple[str, str]:
    """toy_raw prepared in this process with data.folds=2 (96 px): (prepared_dir, version)."""
    from dermaid.config import compose, to_plain
    from dermaid.data.prepare import prepare_dataset

    out = str(tmp_path_factory.mktemp("cv_prepared"))
    data_cfg = to_plain(compose("prepare", [f"data.root={toy_raw}", f"data.prepared_dir={out}", "data.image_size=96",
                                            "data.folds=2"]).data)
    return out, prepare_dataset(data_cfg, out=out, tag="toy2", in_process=True)["version"]


def _overrides(prepared_dir: str, version: str, out: Path, *extra: str) -> list[str]:
    return ["experiment=toy", f"data.prepared_dir={prepared_dir}", f"data.version={version}", f"out={out}",
            "model.name=resnet10t", "train.epochs=1", "train.image_size=64", "logger=none",
            "scaling.num_workers=1", "cv.bootstrap=200", *extra]


def test_cv_two_folds_oof_resume_and_fold_ensemble(ray_session, toy_raw, two_fold_version, dermaid_cli, tmp_path):
    from dermaid.config import compose, to_plain
    from dermaid.data.loading import load_records
    from dermaid.evaluation.evaluate import evaluate
    from dermaid.data.prepare import prepare_dataset
    from dermaid.evaluation.metrics import compute_metrics
    from dermaid.models.card import load_card
    from dermaid.training.cv import cross_validate

    prepared_dir, version = two_fold_version
    out = tmp_path / "cv"
    first = cross_validate(compose("cv", _overrides(prepared_dir, version, out, "cv.folds=[0]")))
    assert first["finished"] == 1 and first["pending"] == [1] and "oof" not in first
    assert not (out / "oof_predictions.csv").exists() and not (out / "fold-1").exists()
    stamps = {name: (out / "fold-0" / name).stat().st_mtime_ns for name in ("summary.json", "best/card.json",
                                                                             "oof/predictions.csv")}

    # the rerun (through the command line) skips fold 0 and trains fold 1 only
    done = dermaid_cli("cv", *_overrides(prepared_dir, version, out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "folds already finished, skipped: [0]" in done.stdout and "training folds [1]" in done.stdout
    assert {name: (out / "fold-0" / name).stat().st_mtime_ns for name in stamps} == stamps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 2 and summary["skipped"] == [0]

    # OOF: every training image exactly once, in the ISIC submission format
    records = load_records(f"{prepared_dir}/{version}", split="all", with_images=False)
    training = records[records["fold"] >= 0].set_index("image_id")
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert list(oof.columns) == ["image", *SUBMISSION_CODES]
    assert sorted(oof["image"]) == sorted(training.index) and not oof["image"].duplicated().any()
    probs = oof[list(CLASS_CODES)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    metrics = json.loads((out / "oof_metrics.json").read_text())
    expected = compute_metrics(training.loc[oof["image"], "label_idx"].to_numpy(), probs)
    assert metrics["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    low, high = metrics["balanced_accuracy_ci"]
    assert low <= metrics["balanced_accuracy"] <= high and low < high
    assert {"sensitivity", "specificity", "auc"} <= set(metrics["per_class"]["NV"])
    table = pd.read_csv(out / "cv_summary.csv", dtype={"fold": str})
    assert table["fold"].tolist() == ["0", "1", "oof"] and table["images"].iloc[:2].sum() == len(training)

    # the fold ensemble: its checkpoint gives what the test comparison reported (the mean of the folds)
    comparison = pd.read_csv(out / "test_comparison.csv")
    assert comparison["model"].tolist() == ["fold-0", "fold-1", "ensemble"]
    card = load_card(str(out / "ensemble"))
    assert card.kind == "ensemble" and [m["fold"] for m in card.ensemble["members"]] == [0, 1]
    assert card.metrics["test"]["balanced_accuracy"] == pytest.approx(comparison["balanced_accuracy"].iloc[-1])
    evaluate({"checkpoint": str(out / "ensemble"), "split": "test", "tta": 0, "calibrated": True, "device": "cpu",
              "batch_size": 64, "out": str(tmp_path / "ens-test"), "ood": None,
              "data": {"prepared_dir": prepared_dir, "version": version, "fold": 0}})
    evaluated = pd.read_csv(tmp_path / "ens-test" / "predictions.csv")
    reported = pd.read_csv(out / "ensemble_test_predictions.csv")
    assert evaluated["image"].tolist() == reported["image"].tolist()
    np.testing.assert_allclose(evaluated[list(CLASS_CODES)].to_numpy(), reported[list(CLASS_CODES)].to_numpy(),
                               atol=1e-6)
    assert "out-of-fold balanced accuracy" in done.stdout and "ensemble" in done.stdout

    # a rerun asking for other data or other training is refused before anything trains
    other = tmp_path / "other"  # the same images split into 3 folds: another dataset version
    prepare_dataset(to_plain(compose("prepare", [f"data.root={toy_raw}", f"data.prepared_dir={other}",
                                                 "data.image_size=96", "data.folds=3"]).data),
                    out=str(other), tag="toy3", in_process=True)
    with pytest.raises(DermaidError, match=rf"holds folds trained on dataset version {version}, not "):
        cross_validate(compose("cv", _overrides(str(other), "toy3", out)))
    with pytest.raises(DermaidError, match=r"train\.epochs=1 before, 2 now"):
        cross_validate(compose("cv", _overrides(prepared_dir, version, out, "train.epochs=2")))
    assert json.loads((out / "summary.json").read_text())["finished"] == 2  # nothing stored was touched


def test_cv_config_composes_and_bad_fold_lists_are_refused(two_fold_version, tmp_path):
    from dermaid.config import compose
    from dermaid.training.cv import cross_validate

    prepared_dir, version = two_fold_version
    cfg = compose("cv", _overrides(prepared_dir, version, tmp_path / "cv"))
    assert cfg.cv.max_concurrent == 1 and cfg.cv.folds is None and cfg.train.epochs == 1
    with pytest.raises(DermaidError, match=r"cv.folds=\[2\]: folds are 0..1"):
        cross_validate(compose("cv", _overrides(prepared_dir, version, tmp_path / "cv", "cv.folds=[2]")))
    assert not (tmp_path / "cv").exists()


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_images():
    from dermaid.evaluation.metrics import balanced_accuracy, bootstrap_interval

    rng = np.random.default_rng(0)
    widths = []
    for n in (80, 2000):
        labels = rng.integers(0, len(CLASS_CODES), n)
        probs = rng.random((n, len(CLASS_CODES)))
        probs[np.arange(n), labels] += 0.4 * (rng.random(n) < 0.7)  # ~70% right
        low, high = bootstrap_interval(labels, probs, n_resamples=300, seed=1)
        assert low < balanced_accuracy(labels, probs) < high
        assert (low, high) == bootstrap_interval(labels, probs, n_resamples=300, seed=1)  # seeded: reproducible
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~1/sqrt(n): 25x the images, ~5x narrower
