"""`dermaid predict` (one image printed; a folder on Ray Data into the ISIC CSV, details and an errors file) and
`dermaid evaluate` on compressed artifacts (issue 20, items 2 and 3).

Fast tier: one image, bad inputs, evaluate on ONNX / int8 artifacts made from conftest's trained_run (no Ray).
Integration: a folder with unreadable and hostile files through Ray Data (ray_session; run under
`flock /tmp/dermaid-ray.lock`).
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermaid.classes import CLASS_CODES, DISCLAIMER, SUBMISSION_CODES
from dermaid.config import compose
from dermaid.data.isic import read_records
from dermaid.data.loading import load_records
from dermaid.files import read_bytes
from dermaid.inference import RETAKE_MESSAGE, Predictor, build_result
from dermaid.inference.batch import image_ids
from dermaid.inference.loaders import tta_refusal
from dermaid.models.card import load_card, replace_card


def _data_overrides(toy_prepared: str) -> list[str]:
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    return [f"data.prepared_dir={prepared_dir}", f"data.version={version}"]


def _raw_urls(toy_raw: str) -> dict[str, str]:
    """image id -> raw JPEG path of the toy set."""
    return read_records(toy_raw).set_index("image_id")["image_url"].to_dict()


def _document_jpeg() -> bytes:
    """A photo of a document (dermaid synth kind=ood): what a calibrated checkpoint refuses."""
    from dermaid.data.synth_ood import iter_ood_images

    _, data = next(iter_ood_images(1, seed=0, kinds=("document",)))
    return data


@pytest.fixture
def predict_cli(dermaid_cli, tmp_path):
    """`dermaid predict <args>` in this process, Hydra's outputs under tmp_path."""
    return lambda *args: dermaid_cli("predict", *args, cwd=tmp_path)


# ---------------------------------------------------------------------------------------------
# One image, bad input (fast)


def test_one_image_prints_the_answer_serve_gives(tiny_checkpoint, toy_raw, predict_cli, tmp_path):
    url = sorted(_raw_urls(toy_raw).values())[0]
    proc = predict_cli(f"checkpoint={tiny_checkpoint}", f"inputs={url}", "age=55", "sex=male", "site=posterior torso")
    assert proc.returncode == 0, proc.stderr
    predictor = Predictor(tiny_checkpoint)
    probs = predictor.predict([(read_bytes(url), 55, "male", "posterior torso")])[0]
    result = build_result(probs)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{url} (model {predictor.version})"
    top = result["probabilities"][:3]
    assert [line.split()[0] for line in lines[1:4]] == [row["code"] for row in top]
    assert [float(line.split()[-1]) for line in lines[1:4]] == [round(row["probability"], 3) for row in top]
    assert f"malignancy score {result['malignancy_score']:.3f} -> {result['triage']['level']}" in proc.stdout
    assert result["triage"]["message"] in proc.stdout and "no OOD detector" in proc.stdout
    assert DISCLAIMER in proc.stdout
    assert not (tmp_path / "runs").exists()  # out=null: one image writes nothing


def test_one_refused_image_gets_the_retake_message_not_a_diagnosis(calibrated_checkpoint, predict_cli, tmp_path):
    photo = tmp_path / "document.jpg"
    photo.write_bytes(_document_jpeg())
    batch = Predictor(calibrated_checkpoint).predict_full([(photo.read_bytes(), None, None, None)])
    assert batch.abstain is not None and bool(batch.abstain[0]), "the calibrated toy model should refuse a document"
    proc = predict_cli(f"checkpoint={calibrated_checkpoint}", f"inputs={photo}", f"out={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert "abstained" in proc.stdout and RETAKE_MESSAGE in proc.stdout and "unreliable" in proc.stdout
    assert "malignancy score" not in proc.stdout and DISCLAIMER in proc.stdout
    details = pd.read_csv(tmp_path / "out" / "details.csv")
    assert details["abstain"].tolist() == [True] and details["triage"].isna().all()
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(predictions.columns) == ["image", *SUBMISSION_CODES] and predictions["image"].tolist() == ["document"]
    assert predictions["UNK"].iloc[0] > 0.5  # above the threshold: UNK is the detector's normalised score


def test_bad_inputs_are_one_line_and_exit_2(tiny_checkpoint, toy_raw, predict_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(read_bytes(sorted(_raw_urls(toy_raw).values())[0])[:3000])
    cases = {
        str(empty): "no files",
        str(texts): "1 file(s), none named as an image",
        str(tmp_path / "missing"): "no such file or folder",
        "memory://dermaid-nowhere/incoming": "no such file or folder",
        str(tmp_path / "empty" / "*.jpg"): "no files",
        str(broken): "image could not be decoded",
    }
    for inputs, message in cases.items():
        proc = predict_cli(f"checkpoint={tiny_checkpoint}", f"inputs={inputs}")
        assert proc.returncode == 2, (inputs, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and message in proc.stderr and inputs in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = predict_cli(f"inputs={empty}")
    assert proc.returncode == 2 and "checkpoint= is required" in proc.stderr
    url = sorted(_raw_urls(toy_raw).values())[0]
    for key, value in (("sex", "alien"), ("age", "300"), ("site", "elbow")):
        proc = predict_cli(f"checkpoint={tiny_checkpoint}", f"inputs={url}", f"{key}={value}")
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {key}=") and "expected" in proc.stderr


def test_image_ids_are_file_names_unless_two_share_one():
    assert image_ids(["/d/a/ISIC_1.jpg", "/d/b/ISIC_2.png"]) == ["ISIC_1", "ISIC_2"]
    assert image_ids(["gs://b/in/x/ISIC_1.jpg", "gs://b/in/y/ISIC_1.jpg", "gs://b/in/y/ISIC_2.jpg"]) == [
        "x/ISIC_1", "y/ISIC_1", "ISIC_2"]


# ---------------------------------------------------------------------------------------------
# Every artifact evaluable (fast: in-process export and quantization of trained_run)


@pytest.fixture(scope="module")
def artifacts(trained_run, tmp_path_factory) -> dict[str, str]:
    """trained_run's best as an ONNX graph and a dynamic int8 ONNX (dermaid export / quantize, as test_compress)."""
    from dermaid.compress.export import run_export
    from dermaid.compress.quantize import run_quantize

    work = tmp_path_factory.mktemp("predict_artifacts")
    teacher = f"{trained_run}/best"
    run_export(compose("export", [f"checkpoint={teacher}", f"out={work / 'onnx'}", "format=onnx"]))
    run_quantize(compose("quantize", [f"checkpoint={teacher}", f"out={work / 'int8'}", "method=dynamic",
                                      "evaluate=false"]))
    return {"onnx": str(work / "onnx"), "quantized_dynamic": str(work / "int8")}


@pytest.mark.parametrize("kind", ["onnx", "quantized_dynamic"])
def test_evaluate_on_a_compressed_artifact_equals_the_predictor(kind, artifacts, toy_raw, toy_prepared, tmp_path,
                                                                dermaid_cli):
    checkpoint = artifacts[kind]
    assert load_card(checkpoint).kind == kind
    out = tmp_path / "eval"
    proc = dermaid_cli("evaluate", f"checkpoint={checkpoint}", *_data_overrides(toy_prepared), "split=val",
                       "batch_size=64", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not float weights" not in proc.stderr and "balanced accuracy" in proc.stdout
    evaluated = pd.read_csv(out / "predictions.csv")

    # The Predictor (the Serve path) on the raw uploads of the same images, in one batch as evaluate's one batch
    # (dynamic int8 quantizes activations per batch): the same probabilities.
    val = load_records(toy_prepared, "val", 0)
    assert 0 < len(val) <= 64 and evaluated["image"].tolist() == val["image_id"].tolist()
    raw = _raw_urls(toy_raw)
    items = [(read_bytes(raw[row.image_id]), row.age, row.sex, row.site) for row in val.itertuples(index=False)]
    served = Predictor(checkpoint).predict(items)  # (N, 8)
    assert np.abs(evaluated[list(CLASS_CODES)].to_numpy() - served).max() < 1e-5
    assert served.std(axis=0).max() > 1e-3  # distinct images, distinct answers

    # `dermaid predict` takes the same artifact for one image
    one = dermaid_cli("predict", f"checkpoint={checkpoint}", f"inputs={raw[val['image_id'].iloc[0]]}", cwd=tmp_path)
    assert one.returncode == 0 and f"-{kind}-" in one.stdout.splitlines()[0], one.stderr


def test_tta_is_refused_only_where_the_artifact_cannot_run_the_views(artifacts, toy_prepared, tmp_path, dermaid_cli):
    onnx = load_card(artifacts["onnx"])
    assert tta_refusal(onnx, 8) is None  # square input: every view keeps (H, W)
    wide = dataclasses.replace(onnx, input={**onnx.input, "input_size": [3, 64, 96]})
    assert tta_refusal(wide, 4) is None and "tta=4 (flips)" in tta_refusal(wide, 8)
    float_wide = dataclasses.replace(wide, kind="float")
    assert tta_refusal(float_wide, 8) is None

    checkpoint = tmp_path / "wide-onnx"
    shutil.copytree(artifacts["onnx"], checkpoint)
    replace_card(str(checkpoint), wide)
    proc = dermaid_cli("evaluate", f"checkpoint={checkpoint}", *_data_overrides(toy_prepared), "tta=8",
                       f"out={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 2 and "a onnx artifact runs only at its exported 64x96 input" in proc.stderr

    out = tmp_path / "tta4"  # flips on a compressed artifact: evaluated, not refused
    proc = dermaid_cli("evaluate", f"checkpoint={artifacts['onnx']}", *_data_overrides(toy_prepared), "tta=4",
                       f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "predictions.csv").exists()


# ---------------------------------------------------------------------------------------------
# A folder on Ray Data (integration)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_predict_a_folder_with_unreadable_and_hostile_files(calibrated_checkpoint, toy_raw, ray_session, tmp_path,
                                                            predict_cli):
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    good = sorted(_raw_urls(toy_raw).values())[:10]
    for i, url in enumerate(good):
        shutil.copy(url, folder / ("sub" if i % 3 == 0 else "") / Path(url).name)
    (folder / "document.jpg").write_bytes(_document_jpeg())
    first = Path(good[0]).read_bytes()
    hostile = {
        "truncated.jpg": (first[:4000], "image could not be decoded"),
        "fake.png": (b"GIF89a" + b"\x00" * 64, "UnidentifiedImageError"),  # the card's preparation decodes first
        "strip.png": (_png(Image.new("RGB", (1, 400))), "aspect ratio"),
        "bomb.png": (_png(Image.new("1", (10_000, 6_000))), "the limit is 50000000"),
        "huge.jpg": (first + b"\x00" * 1_100_000, "the limit is 1 MiB"),
        "empty.jpg": (b"", "empty image"),
    }
    for name, (data, _) in hostile.items():
        (folder / name).write_bytes(data)
    (folder / "README.txt").write_text("not an image")

    out = tmp_path / "out"
    proc = predict_cli(f"checkpoint={calibrated_checkpoint}", f"inputs={folder}", f"out={out}", "batch_size=4",
                       "max_upload_mb=1", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "11 predicted" in proc.stdout and "6 unreadable" in proc.stdout and DISCLAIMER in proc.stdout
    assert "1 file(s) skipped" in proc.stdout

    errors = pd.read_csv(out / "errors.csv").set_index("path")
    assert sorted(errors.index) == sorted(str(folder / name) for name in hostile)
    for name, (_, reason) in hostile.items():
        assert reason in errors.loc[str(folder / name), "reason"], (name, errors.loc[str(folder / name), "reason"])

    # Each predicted row is the Predictor's answer on that file (no metadata), UNK its normalised OOD score.
    predictions = pd.read_csv(out / "predictions.csv")
    details = pd.read_csv(out / "details.csv")
    assert list(predictions.columns) == ["image", *SUBMISSION_CODES]
    paths = sorted(str(p) for p in folder.rglob("*.jpg") if p.name not in hostile)
    assert details["path"].tolist() == paths and predictions["image"].tolist() == [Path(p).stem for p in paths]
    predictor = Predictor(calibrated_checkpoint)
    batch = predictor.predict_full([(Path(p).read_bytes(), None, None, None) for p in paths])
    assert np.abs(predictions[list(CLASS_CODES)].to_numpy() - batch.probabilities).max() < 1e-5
    assert np.abs(predictions["UNK"].to_numpy() - predictor.ood.unk(batch.ood_scores)).max() < 1e-5
    assert np.abs(details["ood_score"].to_numpy() - batch.ood_scores).max() < 1e-5
    assert details["abstain"].tolist() == batch.abstain.tolist()
    assert details.set_index("image").loc["document", "abstain"]  # the document photo is refused, not diagnosed
    for row, probs, abstain, score in zip(details.itertuples(), batch.probabilities, batch.abstain, batch.ood_scores):
        expected = build_result(probs, operating_point=predictor.card.triage, ood_score=score, abstain=abstain)
        assert (row.triage if isinstance(row.triage, str) else None) == (expected["triage"] or {}).get("level")
