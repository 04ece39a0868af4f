"""`dermaid calibrate` on a real trained toy run: OOD statistics + card blocks, the Predictor's ood_score and
abstain, evaluate's triage operating point and UNK column (accepted by the official scorer), and clear errors
for old cards, mismatched statistics and compressed artifacts. No Ray: everything runs in this process."""

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
from dermaid.config import compose, to_plain
from dermaid.data.loading import load_records
from dermaid.data.synth_ood import OOD_KINDS, generate_ood, generate_ood_image
from dermaid.errors import DermaidError
from dermaid.evaluation.calibrate import calibrate
from dermaid.evaluation.evaluate import evaluate
from dermaid.evaluation.metrics import compute_metrics
from dermaid.evaluation.ood import METHODS, create_detector, load_statistics, save_statistics
from dermaid.inference import RETAKE_MESSAGE, Predictor, build_result
from dermaid.models.card import CheckpointError, load_card, save_checkpoint
from dermaid.models.classifier import create_classifier

REFUSE_SHARE = 0.05


def _data_overrides(toy_prepared: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return [f"data.prepared_dir={prepared_dir}", f"data.version={version}"]


def _jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def calibrated(trained_run, toy_prepared, tmp_path_factory) -> str:
    """trained_run's best/ copied (the fixture is read-only) and calibrated with a small generated OOD set."""
    checkpoint = tmp_path_factory.mktemp("calibrated") / "best"
    shutil.copytree(Path(trained_run) / "best", checkpoint)
    prepared_dir = toy_prepared.rstrip("/").rsplit("/", 1)[0]  # data.version: the card's own (the default)
    calibrate(compose("calibrate", [f"checkpoint={checkpoint}", f"data.prepared_dir={prepared_dir}",
                                    f"ood.refuse_share={REFUSE_SHARE}", "ood.validation_set.n_per_kind=4"]))
    return str(checkpoint)


def test_calibrate_writes_statistics_and_only_the_card_blocks(calibrated, trained_run):
    before = json.loads((Path(trained_run) / "best" / "card.json").read_text())
    after = json.loads((Path(calibrated) / "card.json").read_text())
    assert {key: value for key, value in after.items() if key not in ("ood", "triage")} == before
    card = load_card(calibrated)
    assert (Path(calibrated) / card.ood["statistics"]).is_file() and card.ood["refuse_share"] == REFUSE_SHARE
    assert card.ood_method in METHODS and card.ood["fitted_on"] == card.dataset_version
    assert set(card.ood["validation"]) == set(METHODS)
    for row in card.ood["validation"].values():
        assert 0.0 <= row["auroc"] <= 1.0 and row["refused_in"] <= REFUSE_SHARE + 1.0 / 20
    chosen = card.ood["validation"][card.ood_method]
    assert chosen["auroc"] == max(row["auroc"] for row in card.ood["validation"].values())  # ood.default: auto
    assert chosen["auroc"] > 0.8 and chosen["refused_out"] > 0.5  # the toy model tells lesions from the rest
    triage = card.triage
    assert triage["malignant_codes"] == ["MEL", "BCC", "SCC"] and triage["target_sensitivity"] == 0.95
    assert triage["sensitivity"] >= 0.95 and triage["tp"] + triage["fn"] > 0
    assert card.triage_cutoff == triage["cutoff"]


def test_the_threshold_refuses_about_refuse_share_of_validation_and_evaluate_reports_an_ood_set(
        calibrated, toy_prepared, tmp_path):
    ood_set = str(tmp_path / "ood")
    generate_ood(ood_set, n_per_kind=2, seed=0)  # `dermaid synth kind=ood`'s writer
    result = evaluate(compose("evaluate", [f"checkpoint={calibrated}", *_data_overrides(toy_prepared),
                                           f"out={tmp_path}/eval", "split=val", f"ood={ood_set}"]))
    report = result["metrics"]["ood"]
    assert report["refused_in"] <= REFUSE_SHARE + 1.0 / result["num_images"]
    assert report["method"] == load_card(calibrated).ood_method == report["ood_set"]["default_method"]
    assert set(report["ood_set"]["methods"]) == set(METHODS)
    validation = load_card(calibrated).ood["validation"]
    for method, row in report["ood_set"]["methods"].items():
        assert row["n_out"] == 2 * len(OOD_KINDS) and set(row["per_kind"]) == set(OOD_KINDS)
        assert row["refused_in"] == pytest.approx(validation[method]["refused_in"])  # same images, same threshold
    assert report["ood_set"]["methods"][report["method"]]["auroc"] > 0.8


def test_predictor_abstains_on_a_document_and_mostly_answers_toy_lesions(calibrated, trained_run, toy_prepared):
    predictor = Predictor(calibrated)
    document = _jpeg(generate_ood_image("document", np.random.default_rng(5), (320, 240)))
    lesions = load_records(toy_prepared, "val", 0)["image"].tolist()
    items = [(document, None, None, None)] + [(data, None, None, None) for data in lesions]
    batch = predictor.predict_full(items)
    assert batch.probabilities.shape == (len(items), len(CLASS_CODES)) and batch.ood_scores.shape == (len(items),)
    assert np.array_equal(batch.probabilities, predictor.predict(items))  # predict is unchanged
    assert batch.abstain[0] and batch.ood_scores[0] > predictor.ood.threshold
    assert batch.abstain[1:].mean() <= 0.2  # the validation images themselves: about refuse_share refused

    refused = build_result(batch.probabilities[0], ood_score=batch.ood_scores[0], abstain=batch.abstain[0])
    assert refused["message"] == RETAKE_MESSAGE and refused["triage"] is None and refused["top"] is None
    assert refused["probabilities_reliable"] is False and len(refused["probabilities"]) == len(CLASS_CODES)
    answered = build_result(batch.probabilities[1], operating_point=predictor.card.triage,
                            ood_score=batch.ood_scores[1], abstain=False)
    high = answered["malignancy_score"] >= predictor.card.triage_cutoff
    assert answered["abstain"] is False and (answered["triage"]["level"] == "high") == high

    old = Predictor(f"{trained_run}/best").predict_full(items[:2])  # a card from before calibrate
    assert old.ood_scores is None and old.abstain is None
    assert np.allclose(old.probabilities, batch.probabilities[:2], atol=1e-12)
    assert "abstain" not in build_result(old.probabilities[0])  # serve's call today: unchanged keys


def test_statistics_that_do_not_fit_the_model_are_a_clear_error(calibrated, tmp_path):
    card = load_card(calibrated)
    fitted = load_statistics(calibrated, card.ood["statistics"])
    rng = np.random.default_rng(0)
    other_backbone = create_detector("knn", k=3).fit(rng.normal(size=(40, 7)), rng.normal(size=(40, 8)),
                                                     rng.integers(0, 8, size=40))  # 7-d features
    other_classes = create_detector("msp").fit(None, rng.normal(size=(40, 5)), rng.integers(0, 5, size=40))
    for name, statistics, says in [("features", {**fitted, "knn": other_backbone}, "7-d features, model gives"),
                                   ("classes", {**fitted, "msp": other_classes}, "for 5 classes, model gives 8")]:
        broken = tmp_path / name
        shutil.copytree(calibrated, broken)
        save_statistics(str(broken), statistics)
        with pytest.raises(CheckpointError, match=says):
            Predictor(str(broken))


def test_evaluate_reports_the_triage_point_and_an_unk_column_the_official_scorer_accepts(
        calibrated, toy_prepared, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate(compose("evaluate", [f"checkpoint={calibrated}", *_data_overrides(toy_prepared),
                                            f"out={out}", "split=test"]))["metrics"]
    triage = metrics["triage"]
    assert triage["cutoff"] == load_card(calibrated).triage_cutoff and triage["tp"] + triage["fn"] > 0
    assert 0.0 <= triage["sensitivity"] <= 1.0 and triage["tp"] + triage["fn"] + triage["tn"] + triage["fp"] == \
        metrics["num_labeled"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["UNK"].between(0.0, 1.0).all() and predictions["UNK"].std() > 0

    # Three generated documents as UNK positives in the truth, scored through the Predictor (the same detector)
    predictor = Predictor(calibrated)
    documents = [_jpeg(generate_ood_image("document", np.random.default_rng(seed), (300, 300))) for seed in range(3)]
    batch = predictor.predict_full([(data, None, None, None) for data in documents])
    unk_rows = pd.DataFrame(batch.probabilities, columns=list(CLASS_CODES))
    unk_rows["UNK"] = predictor.ood.unk(batch.ood_scores)
    unk_rows.insert(0, "image", [f"ISIC_UNK_{i}" for i in range(3)])
    predictions = pd.concat([predictions, unk_rows], ignore_index=True)
    test = load_records(toy_prepared, "test", 0, with_images=False).set_index("image_id")
    labels = np.append(test.loc[predictions["image"][:-3], "label_idx"].to_numpy(), [len(CLASS_CODES)] * 3)
    truth = pd.DataFrame(np.eye(len(SUBMISSION_CODES))[labels], columns=list(SUBMISSION_CODES))
    truth.insert(0, "image", predictions["image"])
    score = ClassificationScore.from_stream(io.StringIO(truth.to_csv(index=False)),
                                            io.StringIO(predictions.to_csv(index=False)),
                                            ClassificationMetric.BALANCED_ACCURACY)
    ours = compute_metrics(labels, predictions[list(SUBMISSION_CODES)].to_numpy(), codes=SUBMISSION_CODES)
    assert score.per_category.loc["UNK", "auc"] == pytest.approx(ours["per_class"]["UNK"]["auc"], abs=1e-12)
    assert score.per_category.loc["UNK", "auc"] > 0.9  # documents score far above the toy test lesions


def test_forward_with_features_on_two_threads_keeps_each_calls_own_statistics():
    """A serving replica runs forwards on two threads through one model (serve/lanes.py): each call's feature hooks
    must keep only its own thread's activations (they once mixed: 500s, or another image's OOD statistics)."""
    import threading

    torch.manual_seed(0)
    model = create_classifier({"name": "test_efficientnet", "use_metadata": False}).eval()
    inputs = [torch.randn(2 + i % 2, 3, 64, 64) for i in range(2)]  # different batch sizes: (B_i, 3, H, W)
    with torch.no_grad():
        expected = [model.forward_with_features(images)[0] for images in inputs]  # one thread: (B_i, D)
    mismatches, errors = [], []

    def run(index: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(40):
                    features, _ = model.forward_with_features(inputs[index])
                    if not torch.allclose(features, expected[index], rtol=1e-5, atol=1e-5):
                        mismatches.append(index)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and mismatches == []


def test_forward_with_features_is_what_the_head_sees_and_forward_is_unchanged():
    torch.manual_seed(0)
    model = create_classifier({"name": "test_efficientnet", "use_metadata": True}).eval()
    images = torch.randn(3, 3, 64, 64)  # (B, 3, H, W)
    layout = model.feature_layout
    with torch.no_grad():
        features, logits = model.forward_with_features(images)  # (B, D), (B, K)
        assert features.shape == (3, model.feature_dim) and torch.equal(logits, model(images))
        head = features[:, layout["head"][0]:layout["head"][1]]  # (B, F + M)
        assert torch.equal(model.head(head), logits)  # eval mode: dropout is the identity
        stem = dict(model.backbone.named_modules())[model.feature_levels[0][0]]
        seen = []
        handle = stem.register_forward_hook(lambda module, inputs, output: seen.append(output))
        model(images)
        handle.remove()
    start, stop = layout["level0"]
    flat = seen[0].flatten(2)  # (B, C_0, H_0 * W_0)
    expected = torch.cat([flat.mean(2), flat.std(2, unbiased=False)], 1)  # (B, 2 C_0): mean | population std
    assert torch.allclose(features[:, start:stop], expected, rtol=1e-4, atol=1e-4)
    assert stop == model.feature_dim - sum(2 * c for _, c in model.feature_levels[1:])


def test_old_cards_load_and_feature_methods_on_a_compressed_artifact_are_a_clear_error(tiny_checkpoint, tmp_path,
                                                                                      capsys):
    card = load_card(tiny_checkpoint)
    assert card.ood is None and card.triage is None and card.ood_method is None and card.triage_cutoff is None
    assert "ood" not in card.to_dict() and "triage" not in card.to_dict()
    onnx = str(tmp_path / "onnx")
    save_checkpoint(onnx, card.derived("onnx", "model.onnx", {"source": tiny_checkpoint}), artifact_bytes=b"")
    with pytest.raises(DermaidError, match=r"onnx checkpoint gives no penultimate features.*name msp and/or energy"):
        calibrate(compose("calibrate", [f"checkpoint={onnx}", "ood.methods=[knn,multilayer]"]))
    with pytest.raises(DermaidError, match=r"ood.default='knn' needs penultimate features.*\['msp'\]"):
        calibrate(compose("calibrate", [f"checkpoint={onnx}", "ood.methods=[msp,knn]", "ood.default=knn"]))
    assert "ood.methods ['knn'] are not fitted" in capsys.readouterr().out


def test_an_ensemble_of_members_held_out_on_different_folds_is_refused(tiny_checkpoint, tmp_path):
    import dataclasses

    card = load_card(tiny_checkpoint)
    members = [{"path": f"members/0{fold}", "kind": "float", "fold": fold} for fold in (0, 1)]
    ensemble = dataclasses.replace(card, kind="ensemble", artifact="members", ensemble={"members": members})
    save_checkpoint(str(tmp_path / "ens"), ensemble, artifact_bytes=b"")
    with pytest.raises(DermaidError, match=r"members held out different validation folds \(0, 1\)"):
        calibrate(compose("calibrate", [f"checkpoint={tmp_path / 'ens'}"]))


def test_multilayer_levels_must_be_levels_of_the_backbone(tiny_checkpoint):
    from dermaid.evaluation.calibrate import fit_detectors

    torch.manual_seed(0)
    model = create_classifier({"name": "test_efficientnet", "use_metadata": True}).eval()
    with torch.no_grad():
        features, logits = model.forward_with_features(torch.randn(12, 3, 64, 64))  # (N, D), (N, K)
    train = {"features": features.double().numpy(), "logits": logits.double().numpy(), "labels": np.arange(12) % 3}
    ood_cfg = to_plain(compose("calibrate", ["checkpoint=x"]))["ood"]
    card = load_card(tiny_checkpoint)
    fitted = fit_detectors({**ood_cfg, "knn_k": 2}, card, train, model.feature_layout)
    assert sorted(fitted) == sorted(METHODS) and fitted["knn"].columns.tolist() == list(model.feature_layout["head"])
    assert fitted["multilayer"].levels == [model.feature_layout[f"level{i}"] for i in ood_cfg["multilayer_levels"]]
    with pytest.raises(DermaidError, match=r"multilayer_levels=\[9\]: this backbone has feature levels 0..4"):
        fit_detectors({**ood_cfg, "multilayer_levels": [9]}, card, train, model.feature_layout)


# ---------------------------------------------------------------------------------------------
# Ensembles and compressed artifacts: logit detectors through their own model callable


@pytest.fixture(scope="module", params=["ensemble", "int8_dynamic"])
def logit_only(request, trained_run, toy_prepared, tmp_path_factory) -> tuple[str, str]:
    """(kind, checkpoint) calibrated with the default ood.methods (every method: the feature ones are dropped):
    an ensemble of two copies of trained_run's best/ (`dermaid ensemble`'s builder), or its dynamic int8 artifact
    (`dermaid quantize`'s function)."""
    from dermaid.models.ensemble import build_ensemble

    root = tmp_path_factory.mktemp(request.param)
    best = Path(trained_run) / "best"
    if request.param == "ensemble":
        copies = [root / "a", root / "b"]
        for copy in copies:
            shutil.copytree(best, copy)
        checkpoint = str(root / "ens")
        build_ensemble([str(copy) for copy in copies], checkpoint)
    else:
        from dermaid.compress.quantize import run_quantize

        checkpoint = str(root / "int8")
        run_quantize(compose("quantize", [f"checkpoint={best}", f"out={checkpoint}", "method=dynamic",
                                          "evaluate=false", *_data_overrides(toy_prepared)]))
    calibrate(compose("calibrate", [f"checkpoint={checkpoint}", *_data_overrides(toy_prepared),
                                    f"ood.refuse_share={REFUSE_SHARE}", "ood.validation_set.n_per_kind=4"]))
    return request.param, checkpoint


def test_an_ensemble_or_int8_artifact_is_calibrated_serves_abstain_and_may_be_promoted(logit_only, toy_prepared):
    from dermaid.monitoring.reference import REFERENCE_FILE
    from dermaid.registry import check_card

    kind, checkpoint = logit_only
    card = load_card(checkpoint)
    assert card.kind == {"ensemble": "ensemble", "int8_dynamic": "quantized_dynamic"}[kind]
    assert set(card.ood["validation"]) == {"msp", "energy"} and card.ood_method in ("msp", "energy")
    assert (Path(checkpoint) / card.ood["statistics"]).is_file() and (Path(checkpoint) / REFERENCE_FILE).is_file()
    assert card.ood["validation"][card.ood_method]["refused_in"] <= REFUSE_SHARE + 1.0 / 20
    assert card.triage["sensitivity"] >= 0.95 and card.triage["tp"] + card.triage["fn"] > 0
    assert check_card(card, checkpoint) == []

    predictor = Predictor(checkpoint)
    document = _jpeg(generate_ood_image("document", np.random.default_rng(5), (320, 240)))
    lesions = load_records(toy_prepared, "val", 0)["image"].tolist()[:8]
    items = [(data, None, None, None) for data in [document, *lesions]]
    batch = predictor.predict_full(items)
    assert batch.ood_scores.shape == batch.abstain.shape == (len(items),) and batch.abstain.dtype == bool
    assert np.isfinite(batch.ood_scores).all() and batch.ood_scores.std() > 0
    assert np.array_equal(batch.abstain, batch.ood_scores > card.ood["threshold"])
    assert np.array_equal(batch.probabilities, predictor.predict(items))
