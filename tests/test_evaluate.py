"""`dermaid evaluate`: predictions.csv the official scorer accepts, metrics.json equal to it, TTA,
the one prediction path, and clear errors for bad checkpoints and unknown classes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

from dermaid.classes import CLASS_CODES, SUBMISSION_CODES
from dermaid.config import compose
from dermaid.data.images import open_image
from dermaid.data.loading import load_records
from dermaid.data.transforms import create_eval_transform
from dermaid.errors import DermaidError
from dermaid.evaluation.evaluate import _check_labels, evaluate
from dermaid.evaluation.metrics import compute_metrics
from dermaid.models.card import CheckpointError, load_card, load_float_model
from dermaid.models.metadata import encode_metadata
from dermaid.training.loop import predict_probabilities


def _data_overrides(toy_prepared: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return [f"data.prepared_dir={prepared_dir}", f"data.version={version}"]


@pytest.fixture
def evaluate_cli(dermaid_cli, tmp_path):
    """`dermaid evaluate <args>` in this process (conftest's dermaid_cli), Hydra's outputs under tmp_path."""
    return lambda *args: dermaid_cli("evaluate", *args, cwd=tmp_path)


def test_evaluate_cli_writes_predictions_the_official_scorer_accepts(trained_run, toy_prepared, tmp_path, evaluate_cli):
    out = tmp_path / "eval"
    proc = evaluate_cli(f"checkpoint={trained_run}/best", *_data_overrides(toy_prepared), f"out={out}", "split=val")
    assert proc.returncode == 0, proc.stderr
    assert "balanced accuracy" in proc.stdout and "not a diagnosis" in proc.stdout
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["image", *SUBMISSION_CODES]
    val = load_records(toy_prepared, "val", 0, with_images=False)
    assert sorted(predictions["image"]) == sorted(val["image_id"])
    assert np.allclose(predictions[list(CLASS_CODES)].sum(axis=1), 1.0) and (predictions["UNK"] == 0).all()
    metrics = json.loads((out / "metrics.json").read_text())

    # The official scorer on the file, with one extra UNK image in the truth (like the ISIC 2019 test
    # set; the scorer cannot score a category without positives), equals our metrics on the same rows.
    truth = pd.DataFrame(np.eye(len(SUBMISSION_CODES))[val["label_idx"]], columns=list(SUBMISSION_CODES))
    truth.insert(0, "image", val["image_id"].tolist())
    truth.loc[len(truth)] = ["ISIC_UNK", *[0.0] * len(CLASS_CODES), 1.0]
    predictions = predictions.set_index("image").loc[val["image_id"]].reset_index()
    predictions.loc[len(predictions)] = ["ISIC_UNK", *[0.0] * len(SUBMISSION_CODES)]
    score = ClassificationScore.from_stream(io.StringIO(truth.to_csv(index=False)),
                                            io.StringIO(predictions.to_csv(index=False)),
                                            ClassificationMetric.BALANCED_ACCURACY)
    labels = np.append(val["label_idx"].to_numpy(), len(CLASS_CODES))  # UNK = index 8 of SUBMISSION_CODES
    ours = compute_metrics(labels, predictions[list(SUBMISSION_CODES)].to_numpy(), codes=SUBMISSION_CODES)
    assert ours["balanced_accuracy"] == pytest.approx(score.overall, abs=1e-12)
    for code in SUBMISSION_CODES:
        for key in ("sensitivity", "specificity", "auc", "ap"):
            assert ours["per_class"][code][key] == pytest.approx(score.per_category.loc[code, key], abs=1e-12, nan_ok=True)
    # and metrics.json is our metric on the 8 classes of the val rows
    eight = compute_metrics(val["label_idx"].to_numpy(), predictions[list(CLASS_CODES)].to_numpy()[:-1])
    assert metrics["balanced_accuracy"] == pytest.approx(eight["balanced_accuracy"], abs=1e-12)
    assert metrics["balanced_accuracy"] > 0.2  # the toy run learned something
    assert metrics["num_images"] == len(val) and metrics["split"] == "val"
    assert metrics["calibration"]["temperature"] == pytest.approx(json.loads(
        (Path(trained_run) / "best" / "card.json").read_text())["calibration"]["temperature"])


def test_evaluate_test_split_with_tta_and_the_one_prediction_path(trained_run, toy_prepared, tmp_path):
    cfg = compose("evaluate", [f"checkpoint={trained_run}/best", *_data_overrides(toy_prepared), f"out={tmp_path}",
                               "split=test", "tta=8", "device=cpu"])
    result = evaluate(cfg)
    test = load_records(toy_prepared, "test", 0)
    assert result["num_images"] == len(test) and result["metrics"]["tta"] == 8
    predictions = pd.read_csv(tmp_path / "predictions.csv").set_index("image")

    # without TTA, predict_probabilities equals the documented path step by step:
    # open_image -> create_eval_transform(card.input) -> model -> softmax(logits / T)
    model, card = load_float_model(f"{trained_run}/best")
    temperature = card.temperature
    rows = test.head(4).to_dict("records")
    probs = predict_probabilities(model, rows, temperature=temperature, input_spec=card.input)
    transform = create_eval_transform(card.input)
    images = torch.stack([transform(open_image(r["image"])) for r in rows])  # (4, 3, H, W)
    metadata = torch.stack([encode_metadata(r["age"], r["sex"], r["site"]) for r in rows])  # (4, 14)
    with torch.no_grad():
        manual = torch.softmax(model(images, metadata).double() / temperature, dim=-1).numpy()
    assert np.allclose(probs, manual, atol=1e-6)
    # TTA averages 8 views: close to, but not the same as, the single view
    tta = predictions.loc[[r["image_id"] for r in rows], list(CLASS_CODES)].to_numpy()
    assert np.allclose(tta.sum(1), 1.0) and not np.allclose(tta, probs, atol=1e-6)


def test_bad_checkpoints_are_clear_errors(trained_run, toy_prepared, tmp_path, evaluate_cli):
    data = _data_overrides(toy_prepared)
    proc = evaluate_cli(f"checkpoint={tmp_path}/missing", *data, f"out={tmp_path}/o1")
    assert proc.returncode == 2 and "not a DermAID checkpoint" in proc.stderr and "Traceback" not in proc.stderr

    other = tmp_path / "other_arch"
    shutil.copytree(Path(trained_run) / "best", other)
    card = json.loads((other / "card.json").read_text())
    card["model"]["name"] = "test_resnet"  # the weights are resnet10t's
    (other / "card.json").write_text(json.dumps(card))
    proc = evaluate_cli(f"checkpoint={other}", *data, f"out={tmp_path}/o2")
    assert proc.returncode == 2 and "do not fit architecture 'test_resnet'" in proc.stderr
    assert "Traceback" not in proc.stderr

    broken = tmp_path / "broken"
    shutil.copytree(Path(trained_run) / "best", broken)
    (broken / "model.pt").write_bytes(b"\x00truncated")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        evaluate(compose("evaluate", [f"checkpoint={broken}", *data, f"out={tmp_path}/o3"]))
    (broken / "card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable model card"):
        evaluate(compose("evaluate", [f"checkpoint={broken}", *data, f"out={tmp_path}/o4"]))


def test_bad_split_and_tta_are_clear_errors(tiny_checkpoint, toy_prepared, tmp_path):
    data = _data_overrides(toy_prepared)
    with pytest.raises(DermaidError, match="split='train'"):
        evaluate(compose("evaluate", [f"checkpoint={tiny_checkpoint}", *data, f"out={tmp_path}", "split=train"]))
    with pytest.raises(DermaidError, match="tta=3"):
        evaluate(compose("evaluate", [f"checkpoint={tiny_checkpoint}", *data, f"out={tmp_path}", "tta=3"]))


def test_a_class_the_model_does_not_know_is_a_clear_error(tiny_checkpoint, toy_raw, tmp_path, evaluate_cli):
    card = load_card(tiny_checkpoint)
    records = pd.DataFrame({"label": ["MEL", "XYZ", None, "XYZ"]})
    with pytest.raises(DermaidError, match=r"2 image\(s\) labelled \['XYZ'\], a class the model does not know"):
        _check_labels(records, card, "memory://v")
    # a raw root whose ground truth has a class column DermAID does not know: named, no traceback
    root = tmp_path / "raw"
    shutil.copytree(toy_raw, root)
    gt = pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv")
    gt.insert(len(gt.columns), "XYZ", 0.0)
    gt.loc[0, list(CLASS_CODES)] = 0.0
    gt.loc[0, "XYZ"] = 1.0
    gt.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    proc = evaluate_cli(f"checkpoint={tiny_checkpoint}", f"data.root={root}",
                        f"data.prepared_dir={tmp_path}/prepared", f"out={tmp_path}/o", "split=all")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ISIC_2019_Training_GroundTruth.csv" in proc.stderr and "unknown class column(s) ['XYZ']" in proc.stderr
