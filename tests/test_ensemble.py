"""Ensembles as one checkpoint (dermaid.models.ensemble): the mean of the members' calibrated probabilities through
the Predictor, `dermaid evaluate`, Grad-CAM (averaged maps) and over HTTP; mismatched members refused.

Members are real timm models (test_efficientnet at 64 px, untrained, different seeds, temperatures and metadata use).

    .venv/bin/python -m pytest tests/test_ensemble.py -q
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from dermaid.classes import CLASS_CODES
from dermaid.inference import Explainer, Predictor
from dermaid.models.card import CheckpointError, build_card, load_card, save_checkpoint
from dermaid.models.classifier import create_classifier, resolve_input_spec
from dermaid.models.ensemble import build_ensemble


def _member(root: Path, name: str, seed: int, temperature: float, use_metadata: bool, size: int = 64) -> str:
    torch.manual_seed(seed)
    model_cfg = {"name": "test_efficientnet", "pretrained": False, "use_metadata": use_metadata}
    model = create_classifier(model_cfg)
    url = str(root / name)
    save_checkpoint(url, build_card(model_cfg, resolve_input_spec(model, size), temperature=temperature,
                                    dataset_version="0123456789abcdef"), model.state_dict())
    return url


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("ensemble_members")
    return [_member(root, "a", 0, 1.5, True), _member(root, "b", 1, 0.7, False), _member(root, "c", 2, 1.0, True)]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ensemble") / "ens")
    build_ensemble(members, out)
    return out


def _image(seed: int, width: int = 120, height: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


ITEMS = [(_image(1), 55, "male", "posterior torso"), (_image(2), None, None, None), (_image(3), 30, "female", None)]


def test_the_card_names_its_members_and_the_directory_holds_them(ensemble, members):
    card = load_card(ensemble)
    assert card.kind == "ensemble" and card.temperature == 1.0 and card.uses_metadata
    entries = card.ensemble["members"]
    assert [e["source"] for e in entries] == members
    assert [e["temperature"] for e in entries] == [1.5, 0.7, 1.0]
    for entry, source in zip(entries, members):  # copied in: the ensemble is one self-contained directory
        assert json.loads((Path(ensemble) / entry["path"] / "card.json").read_text()) == json.loads(
            (Path(source) / "card.json").read_text())
    assert card.input == load_card(members[0]).input and card.dataset_versions == ["0123456789abcdef"]


def test_predictor_gives_the_mean_of_the_members_calibrated_probabilities(ensemble, members):
    predictor = Predictor(ensemble)
    probs = predictor.predict(ITEMS)  # (3, 8)
    expected = np.mean([Predictor(m).predict(ITEMS) for m in members], axis=0)  # each member with its own T
    assert probs.shape == (3, len(CLASS_CODES))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert not np.allclose(probs, Predictor(members[0]).predict(ITEMS), atol=1e-4)  # not one member's answer
    assert predictor.version.startswith("ensemble-ensemble-") and predictor.ood is None
    batch = predictor.predict_full(ITEMS)
    np.testing.assert_allclose(batch.probabilities, probs, atol=1e-12)


def test_evaluate_takes_the_ensemble(ensemble, members, toy_prepared, tmp_path):
    from dermaid.evaluation.evaluate import evaluate

    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)

    def predictions(checkpoint: str, name: str) -> pd.DataFrame:
        evaluate({"checkpoint": checkpoint, "split": "test", "tta": 2, "calibrated": True, "device": "cpu",
                  "batch_size": 32, "out": str(tmp_path / name), "ood": None,
                  "data": {"prepared_dir": prepared_dir, "version": version, "fold": 0}})
        return pd.read_csv(tmp_path / name / "predictions.csv")

    got = predictions(ensemble, "ens")
    parts = [predictions(m, f"m{i}") for i, m in enumerate(members)]
    assert all(p["image"].tolist() == got["image"].tolist() for p in parts)
    expected = np.mean([p[list(CLASS_CODES)].to_numpy() for p in parts], axis=0)
    np.testing.assert_allclose(got[list(CLASS_CODES)].to_numpy(), expected, atol=1e-6)
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["num_images"] == len(got) > 0 and metrics["model"] == "ensemble"


def test_grad_cam_averages_the_members_maps_for_the_ensembles_class(ensemble, members, monkeypatch):
    import dermaid.inference.saliency as saliency

    heats: list[np.ndarray] = []
    real_overlay = saliency.create_overlay

    def spy(image, heat, crop_box, *args, **kwargs):  # records the map each explain() draws
        heats.append(np.asarray(heat))
        return real_overlay(image, heat, crop_box, *args, **kwargs)

    monkeypatch.setattr(saliency, "create_overlay", spy)
    data, age, sex, site = ITEMS[0]
    result = Explainer(Predictor(ensemble)).explain(data, age, sex, site)
    ensemble_probs = Predictor(ensemble).predict([ITEMS[0]])[0]
    assert result.target == CLASS_CODES[int(np.argmax(ensemble_probs))]
    np.testing.assert_allclose(result.probabilities, ensemble_probs, atol=1e-6)
    for member in members:  # each member explained for the ensemble's class
        Explainer(Predictor(member)).explain(data, age, sex, site, target=result.target)
    np.testing.assert_allclose(heats[0], np.mean(heats[1:], axis=0), atol=1e-5)
    assert not np.allclose(heats[0], heats[1], atol=1e-3)  # not one member's map
    assert result.overlay.size == Image.open(io.BytesIO(data)).size


def test_members_with_other_input_sizes_or_class_tables_are_refused(members, tmp_path):
    wide = _member(tmp_path, "wide", 3, 1.0, True, size=96)
    with pytest.raises(CheckpointError, match=r"input specs: input_size \[3, 64, 64\] vs \[3, 96, 96\]"):
        build_ensemble([members[0], wide], str(tmp_path / "e1"))
    renamed = tmp_path / "renamed"
    shutil.copytree(members[1], renamed)
    card = json.loads((renamed / "card.json").read_text())
    card["classes"][3]["name"] = "Solar keratosis"
    (renamed / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"class tables: class 3: name 'Actinic keratosis' vs 'Solar keratosis'"):
        build_ensemble([members[0], str(renamed)], str(tmp_path / "e2"))
    with pytest.raises(CheckpointError, match="at least two"):
        build_ensemble([members[0]], str(tmp_path / "e3"))
    assert not any((tmp_path / name).exists() for name in ("e1", "e2", "e3"))


def test_cli_builds_and_refuses_with_one_line(dermaid_cli, members, tmp_path):
    out = tmp_path / "ens"
    done = dermaid_cli("ensemble", f"members=[{members[0]},{members[1]}]", f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ensemble of 2 members" in done.stdout and load_card(str(out)).kind == "ensemble"
    again = dermaid_cli("ensemble", f"members=[{members[0]},{members[2]}]", f"out={out}", cwd=tmp_path)
    assert again.returncode == 2 and "holds a checkpoint already" in again.stderr
    assert [e["source"] for e in load_card(str(out)).ensemble["members"]] == members[:2]  # kept
    missing = dermaid_cli("ensemble", f"members=[{members[0]},{tmp_path / 'nope'}]", f"out={tmp_path / 'x'}",
                          cwd=tmp_path)
    assert missing.returncode == 2 and "not a DermAID checkpoint" in missing.stderr
    assert "Traceback" not in missing.stderr


# --- over HTTP: one deployment serves every member ---------------------------------------------------------------

@pytest.fixture(scope="module")
def ensemble_server(ray_session, ensemble, tmp_path_factory):
    from ray import serve

    from conftest import start_test_app

    base = start_test_app(ensemble, "dermaid-ensemble", tmp_path_factory)
    yield base
    serve.shutdown()


def test_http_classify_and_saliency_serve_the_ensemble(ensemble_server, ensemble, members):
    base = ensemble_server
    model = requests.get(f"{base}/v1/model", timeout=30).json()
    assert model["card"]["kind"] == "ensemble"  # the member list (with its paths) is on /v1/review/model only
    expected = np.mean([Predictor(m).predict(ITEMS) for m in members], axis=0)  # (3, 8)
    for (data, age, sex, site), row in zip(ITEMS, expected):
        fields = {k: str(v) for k, v in (("age", age), ("sex", sex), ("site", site)) if v is not None}
        response = requests.post(f"{base}/v1/classify", files={"image": ("x.jpg", data, "image/jpeg")}, data=fields,
                                 timeout=60)
        assert response.status_code == 200, response.text
        served = {c["code"]: c["probability"] for c in response.json()["probabilities"]}
        assert [served[code] for code in CLASS_CODES] == pytest.approx(row.tolist(), abs=1e-6)
    saliency = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", ITEMS[0][0])},
                             data={"format": "json", "age": "55", "sex": "male", "site": "posterior torso"}, timeout=60)
    assert saliency.status_code == 200, saliency.text
    assert saliency.json()["target"] == CLASS_CODES[int(np.argmax(expected[0]))]
