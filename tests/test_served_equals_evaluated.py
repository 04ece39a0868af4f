"""Served input equals evaluated input (issue 16, item 5): a raw upload through the Predictor gives the
probabilities `dermaid evaluate` gives on that image's prepared row, because the card records how prepare made
the training images (card.preparation) and the Predictor runs prepare's own process_image on the upload; and the
eval geometry is timm's, crop mode included. Fast tier: the in-process trained_run, no Ray."""

from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image

from dermaid.data.images import open_image
from dermaid.data.isic import read_records
from dermaid.data.loading import load_records, read_manifest
from dermaid.data.shards import PREPARATION_RULE, prepare_shard, preparation_block
from dermaid.data.transforms import create_eval_transform
from dermaid.evaluation.evaluate import predict_records
from dermaid.files import read_bytes
from dermaid.inference.predictor import Predictor
from dermaid.models.card import CheckpointError, load_card, load_float_model, replace_card
from dermaid.models.classifier import create_classifier, resolve_input_spec

NUM_JPEGS = 5  # raw toy JPEGs compared (the toy set's sizes, 600x450 to 1280x960, all take JPEG draft at 96 px)


def _evaluated(checkpoint: str, records: pd.DataFrame) -> np.ndarray:
    """evaluate's own prediction path on prepared rows: (N, 8) calibrated probabilities."""
    model, card = load_float_model(checkpoint, torch.device("cpu"))
    probs, _ = predict_records(model, records, card.input, card.temperature, 0, torch.device("cpu"))
    return probs


def _served(predictor: Predictor, uploads: list[bytes], records: pd.DataFrame) -> np.ndarray:
    """The Predictor on raw upload bytes with each row's metadata: (N, 8)."""
    items = [(data, row.age, row.sex, row.site) for data, row in zip(uploads, records.itertuples(index=False))]
    return predictor.predict(items)


def _png_row(raw_jpeg: bytes, row: pd.Series, settings: dict, tmp_path) -> tuple[bytes, pd.DataFrame]:
    """A PNG written from a toy image, and its prepared row made by prepare's own shard code."""
    buf = io.BytesIO()
    open_image(raw_jpeg).save(buf, format="PNG")
    png_url = str(tmp_path / "upload.png")
    with open(png_url, "wb") as f:
        f.write(buf.getvalue())
    record = {**row.to_dict(), "image_id": "PNG_0000001", "image_url": png_url}
    shard = str(tmp_path / "png.parquet")
    result = prepare_shard([record], shard, settings)
    assert not result["errors"], result["errors"]
    return buf.getvalue(), pq.read_table(shard).to_pandas()


@pytest.fixture(scope="module")
def uploads(toy_raw, toy_prepared):
    """NUM_JPEGS prepared rows (largest raw images first: the deepest JPEG draft) and their raw JPEG bytes."""
    raw = read_records(toy_raw).set_index("image_id")
    prepared = load_records(toy_prepared, "all")
    sizes = {image_id: open_image(read_bytes(raw.loc[image_id, "image_url"])).size for image_id in prepared["image_id"]}
    by_size = sorted(sizes, key=lambda i: (-min(sizes[i]), i))
    chosen = [*by_size[:NUM_JPEGS - 1], by_size[-1]]  # the largest ones and the smallest
    rows = prepared.set_index("image_id").loc[chosen].reset_index()
    return rows, [read_bytes(raw.loc[image_id, "image_url"]) for image_id in chosen]


def test_card_records_how_the_training_images_were_prepared(trained_run, toy_prepared):
    card = load_card(f"{trained_run}/best")
    settings = read_manifest(toy_prepared)["settings"]
    assert card.preparation == preparation_block(settings)
    assert card.preparation["image_size"] == 96 and card.preparation["quality"] == settings["quality"]
    assert {key: card.preparation[key] for key in PREPARATION_RULE} == PREPARATION_RULE


def test_predictor_on_raw_bytes_equals_evaluate_on_the_prepared_row(trained_run, toy_prepared, uploads, tmp_path):
    checkpoint = f"{trained_run}/best"
    rows, raw_bytes = uploads
    png_bytes, png_row = _png_row(raw_bytes[0], rows.iloc[0], read_manifest(toy_prepared)["settings"], tmp_path)
    records = pd.concat([rows, png_row[rows.columns]], ignore_index=True)
    uploaded = [*raw_bytes, png_bytes]
    assert Image.open(io.BytesIO(uploaded[-1])).format == "PNG"

    served = _served(Predictor(checkpoint), uploaded, records)  # (N, 8)
    evaluated = _evaluated(checkpoint, records)  # (N, 8)
    assert served.shape == evaluated.shape == (NUM_JPEGS + 1, 8)
    assert np.abs(served - evaluated).max() < 1e-6
    assert evaluated.std(axis=0).max() > 1e-3  # distinct images, distinct answers: not a constant model


def test_people_still_see_their_upload_the_overlay_and_size_are_the_uploads(trained_run, uploads):
    """The model sees prepare's smaller pixels; the overlay, the stored size and the crop box stay the upload's."""
    from dermaid.inference.saliency import Explainer

    _, raw_bytes = uploads
    data = raw_bytes[0]
    upload = open_image(data)
    predictor = Predictor(f"{trained_run}/best")
    prepared = predictor.prepare(data)
    assert predictor.preparation is not None and prepared.upload_size == upload.size
    left, top, right, bottom = prepared.crop_box
    assert 0 <= left < right <= upload.width + 1e-6 and 0 <= top < bottom <= upload.height + 1e-6
    assert right - left > upload.width / 2  # in upload pixels, not the 96 px prepared image's
    saliency = Explainer(predictor).explain(data)
    assert saliency.overlay.size == upload.size


def test_an_old_card_keeps_decoding_the_upload_directly(trained_run, uploads, tmp_path):
    checkpoint = str(tmp_path / "old")
    shutil.copytree(f"{trained_run}/best", checkpoint)
    replace_card(checkpoint, dataclasses.replace(load_card(checkpoint), preparation=None))
    rows, raw_bytes = uploads
    old = Predictor(checkpoint)
    assert old.preparation is None
    expected = torch.stack([create_eval_transform(old.input_spec)(open_image(data)) for data in raw_bytes])
    assert torch.equal(torch.stack([old.preprocess(data) for data in raw_bytes]), expected)
    # ... which is the gap this closes: the raw upload is not what evaluate scored
    assert np.abs(_served(old, raw_bytes, rows) - _evaluated(checkpoint, rows)).max() > 1e-6


def test_a_preparation_this_code_does_not_apply_is_refused_at_load(trained_run, tmp_path):
    checkpoint = str(tmp_path / "other")
    shutil.copytree(f"{trained_run}/best", checkpoint)
    card = load_card(checkpoint)
    replace_card(checkpoint, dataclasses.replace(card, preparation={**card.preparation, "format": "WEBP"}))
    with pytest.raises(CheckpointError, match="WEBP"):
        Predictor(checkpoint)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_eval_transform_is_timms_for_every_crop_mode(crop_mode):
    model = create_classifier({"name": "test_efficientnet", "pretrained": False, "use_metadata": False})
    spec = {**resolve_input_spec(model), "crop_mode": crop_mode}
    timm_config = {**timm.data.resolve_model_data_config(model.backbone), "crop_mode": crop_mode}
    assert {key: spec[key] for key in ("crop_pct", "interpolation")} == {
        key: timm_config[key] for key in ("crop_pct", "interpolation")}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 230, 3), dtype=np.uint8))
    ours = create_eval_transform(spec)(image)  # (3, 160, 160)
    theirs = timm.data.create_transform(**timm_config, is_training=False)(image)  # (3, 160, 160)
    assert ours.shape == theirs.shape == (3, 160, 160)
    assert torch.equal(ours, theirs)


def test_input_spec_records_timms_crop_mode():
    model = create_classifier({"name": "resnet10t", "pretrained": False, "use_metadata": False})
    assert resolve_input_spec(model, 64)["crop_mode"] == timm.data.resolve_model_data_config(model.backbone)["crop_mode"]
