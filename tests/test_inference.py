"""dermaid.inference: the one preprocessing path, calibrated probabilities, results, Grad-CAM (no Ray)."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from dermaid.classes import CLASS_CODES, DISCLAIMER
from dermaid.data.images import open_image
from dermaid.data.transforms import create_eval_transform
from dermaid.errors import DermaidError
from dermaid.inference import (CAM_METHODS, LOADERS, Explainer, ImageShapeError, Predictor, build_result,
                               find_cam_target, set_thread_torch_threads)
from dermaid.models.card import CheckpointError, ModelCard, build_card, save_checkpoint
from dermaid.models.classifier import create_classifier, resolve_input_spec


def _image(width: int = 120, height: int = 90, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor(tiny_checkpoint)


def test_preprocessing_is_open_image_then_eval_transform(predictor):
    data = _image(seed=1)
    expected = create_eval_transform(predictor.card.input)(open_image(data))  # (3, 64, 64)
    assert torch.equal(predictor.preprocess(data), expected)
    assert tuple(expected.shape) == (3, 64, 64)


def test_a_16_bit_image_decodes_like_its_8_bit_twin():
    """16-bit grey is put on the 8-bit scale (65535 -> 255), not stretched to its own brightest pixel."""
    rng = np.random.default_rng(4)
    grey8 = rng.integers(20, 120, (40, 50), dtype=np.uint8)  # a dim image: stretching would brighten it
    encoded = {}
    for name, array in (("8", grey8), ("16", grey8.astype(np.uint16) * 257)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        encoded[name] = buf.getvalue()
    assert Image.open(io.BytesIO(encoded["16"])).mode == "I;16"
    assert np.array_equal(np.asarray(open_image(encoded["16"])), np.asarray(open_image(encoded["8"])))


def test_predict_matches_manual_forward_with_temperature(predictor):
    data = _image(seed=2)
    probs = predictor.predict([(data, 60, "female", "lower extremity")])
    assert probs.shape == (1, 8) and probs.sum() == pytest.approx(1.0)
    x = predictor.preprocess(data)[None]
    meta = predictor.encode_metadata(60, "female", "lower extremity")[None]
    with torch.no_grad():
        logits = predictor.model(x, meta)
    assert predictor.temperature == 1.5
    np.testing.assert_allclose(probs, torch.softmax(logits.double() / 1.5, dim=1).numpy(), atol=1e-6)


def test_metadata_reaches_the_model(predictor):
    data = _image(seed=3)
    with_meta, without = predictor.predict([(data, 80, "male", "head/neck"), (data, None, None, None)])
    assert not np.allclose(with_meta, without)


def test_unknown_artifact_kind_names_the_loaders(tmp_path, tiny_checkpoint):
    card = json.loads((__import__("pathlib").Path(tiny_checkpoint) / "card.json").read_text())
    card["kind"] = "tensorrt"
    save_checkpoint(str(tmp_path / "ckpt"), ModelCard.from_dict(card), artifact_bytes=b"x")
    with pytest.raises(CheckpointError, match="tensorrt.*float"):
        Predictor(str(tmp_path / "ckpt"))
    assert "float" in LOADERS


def test_extreme_aspect_ratio_is_rejected_before_resizing(predictor):
    with pytest.raises(ImageShapeError, match="aspect ratio"):
        predictor.preprocess(_image(2000, 40, fmt="PNG"))


def test_build_result_sorts_scores_and_triages():
    probs = [0.30, 0.40, 0.15, 0.05, 0.04, 0.03, 0.02, 0.01]
    result = build_result(probs)
    assert [c["code"] for c in result["probabilities"]][:3] == ["NV", "MEL", "BCC"]
    assert result["top"]["code"] == "NV" and result["top"]["name"] == "Melanocytic nevus"
    assert result["malignancy_score"] == pytest.approx(0.30 + 0.15 + 0.01)
    assert result["triage"]["level"] == "moderate" and result["disclaimer"] == DISCLAIMER
    assert build_result(probs, triage={"high": 0.4})["triage"]["level"] == "high"
    assert build_result(probs, malignant_codes=["SCC"])["triage"]["level"] == "low"
    with pytest.raises(DermaidError, match="XYZ"):
        build_result(probs, malignant_codes=["XYZ"])


def test_crop_box_is_where_the_model_looks(predictor):
    # x coordinate encoded in the red channel: the crop's left column tells where the crop starts.
    width, height = 200, 100
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1))
    img = Image.fromarray(np.stack([ramp, ramp * 0, ramp * 0], -1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    prepared = predictor.prepare(buf.getvalue())
    left, top, right, bottom = prepared.crop_box
    resized = int(64 / predictor.input_spec["crop_pct"])  # shorter side after Resize (100 -> resized)
    offset = round((resized - 64) / 2)
    assert (top, bottom) == pytest.approx((offset * 100 / resized, (offset + 64) * 100 / resized))
    assert right - left == pytest.approx(64 * 100 / resized, abs=0.5)
    seen = np.asarray(prepared.model_input)[:, :, 0].astype(float)
    assert seen[:, 0].mean() == pytest.approx(left / width * 255, abs=8)
    assert seen[:, -1].mean() == pytest.approx(right / width * 255, abs=8)


@pytest.mark.parametrize("name, layer", [("test_efficientnet", "backbone.bn2"), ("test_resnet", "backbone.layer4"),
                                         ("test_vit", "backbone.blocks.5.norm1")])
def test_cam_target_follows_the_architecture(name, layer):
    model = create_classifier({"name": name}).eval()
    target = find_cam_target(model, resolve_input_spec(model)["input_size"])
    assert target.name == layer
    assert (target.reshape is not None) == (name == "test_vit")


def test_transformer_saliency_uses_a_reshape(tmp_path):
    model_cfg = {"name": "test_vit", "use_metadata": False}
    model = create_classifier(model_cfg)
    save_checkpoint(str(tmp_path / "vit"), build_card(model_cfg, resolve_input_spec(model)), model.state_dict())
    explainer = Explainer(Predictor(str(tmp_path / "vit")))
    saliency = explainer.explain(_image(150, 110, seed=4), method="gradcam")
    assert saliency.overlay.size == (150, 110) and saliency.layer.endswith("norm1")


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_gives_an_overlay_at_input_size(predictor, method):
    explainer = Explainer(predictor)
    saliency = explainer.explain(_image(130, 70, seed=5), 40, "male", None, method=method)
    assert saliency.overlay.size == (130, 70) and saliency.method == method
    assert saliency.target in CLASS_CODES and 0 < saliency.probability < 1


def test_saliency_probabilities_match_classify_and_target_is_honoured(predictor):
    explainer = Explainer(predictor)
    data = _image(seed=6)
    probs = predictor.predict([(data, 30, "female", "upper extremity")])[0]
    top = explainer.explain(data, 30, "female", "upper extremity")
    assert top.target == CLASS_CODES[int(np.argmax(probs))]
    np.testing.assert_allclose(top.probabilities, probs, atol=1e-6)
    mel = explainer.explain(data, 30, "female", "upper extremity", target="MEL")
    assert mel.target == "MEL" and mel.probability == pytest.approx(probs[0], abs=1e-6)
    with pytest.raises(DermaidError, match="method"):
        explainer.explain(data, method="scorecam")
    with pytest.raises(DermaidError, match="target"):
        explainer.explain(data, target="XYZ")


def test_concurrent_saliency_calls_do_not_share_state(tiny_checkpoint):
    explainer = Explainer(Predictor(tiny_checkpoint), concurrency=3)
    images = [_image(100 + 10 * i, 80, seed=10 + i) for i in range(6)]
    sequential = [np.asarray(explainer.explain(d).overlay, dtype=int) for d in images]
    with ThreadPoolExecutor(6) as pool:
        concurrent = [np.asarray(s.overlay, dtype=int) for s in pool.map(explainer.explain, images)]
    for a, b in zip(sequential, concurrent):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_a_threads_torch_thread_count_sticks_when_another_thread_sets_its_own():
    """Torch sizes a thread's OpenMP team at its first parallel op, from the count any thread set last:
    a serving pool thread set to 1 must not build a team of 2 there (the team would slow every forward)."""
    import threading

    seen: list[int] = []
    set_here, set_elsewhere = threading.Event(), threading.Event()

    def pool_thread() -> None:
        set_thread_torch_threads(1)
        set_here.set()
        set_elsewhere.wait(timeout=60)
        (torch.randn(512, 512) * 2).sum()  # a parallel op: the lazy per-thread set-up would run here
        seen.append(torch.get_num_threads())

    callers_threads = torch.get_num_threads()
    worker = threading.Thread(target=pool_thread)
    worker.start()
    try:
        set_here.wait(timeout=60)
        torch.set_num_threads(2)  # another thread (a forward lane) sets its own count
        set_elsewhere.set()
        worker.join(timeout=60)
    finally:
        torch.set_num_threads(callers_threads)
    assert seen == [1]


# --- bounded overlays (issue #18 item 3) ---------------------------------------------------------------------------

def _prepared_card_checkpoint(tiny_checkpoint: str, folder) -> str:
    """tiny_checkpoint with a `preparation` block: the model reads prepare's pixels (JPEG draft, 96 px side)."""
    import dataclasses
    import shutil

    from dermaid.data.shards import preparation_block
    from dermaid.models.card import load_card, replace_card

    checkpoint = str(folder / "prepared")
    shutil.copytree(tiny_checkpoint, checkpoint)
    card = load_card(checkpoint)
    preparation = preparation_block({"image_size": 96, "quality": 90})
    replace_card(checkpoint, dataclasses.replace(card, preparation=preparation))
    return checkpoint


def _exif_rotated_jpeg(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    img = Image.open(io.BytesIO(_image(width, height, seed=7)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def test_decode_bounded_is_the_upright_upload_scaled_to_the_long_side():
    from dermaid.data.images import ImageTooLargeError
    from dermaid.inference.decoding import decode_bounded, decode_image, fit_within

    data = _exif_rotated_jpeg(2400, 1600)  # upright 1600 x 2400
    bounded = decode_bounded(data, 600)  # a JPEG draft at 1/2 scale, then bicubic to 600 on the long side
    assert bounded.size == (400, 600) and bounded.mode == "RGB"
    reference = fit_within(decode_image(data), 600)  # the full-size decode, scaled: the same picture
    assert np.abs(np.asarray(bounded, dtype=int) - np.asarray(reference, dtype=int)).mean() < 2
    small = _image(300, 200)
    assert decode_bounded(small, 600).size == (300, 200)  # never upsampled
    one_bit = io.BytesIO()
    Image.new("1", (3000, 1500)).save(one_bit, "PNG")  # a few KB for 4.5 MP
    assert decode_bounded(one_bit.getvalue(), 600).size == (600, 300)
    with pytest.raises(ImageTooLargeError, match="limit is 4000000"):
        decode_bounded(one_bit.getvalue(), 600, max_pixels=4_000_000)


def test_a_large_photos_overlay_is_bounded_full_size_on_request_and_the_model_input_is_unchanged(tiny_checkpoint,
                                                                                                 tmp_path):
    from dermaid.inference.decoding import fit_within

    predictor = Predictor(_prepared_card_checkpoint(tiny_checkpoint, tmp_path))
    explainer = Explainer(predictor, overlay_max_side=500)
    data = _exif_rotated_jpeg(2000, 1200)  # upright 1200 x 2000
    bounded = explainer.explain(data, 50, "male", "back")
    full = explainer.explain(data, 50, "male", "back", full_size=True)
    assert bounded.overlay.size == (300, 500) and full.overlay.size == (1200, 2000)
    # the overlay's size never reaches the model: the same probabilities as classify (prepare's pixels)
    probs = predictor.predict([(data, 50, "male", "back")])[0]
    np.testing.assert_allclose(bounded.probabilities, probs, atol=1e-6)
    np.testing.assert_allclose(full.probabilities, probs, atol=1e-6)
    # the crop box follows the overlay's scale: the bounded overlay is the full one, scaled down
    shrunk = np.asarray(fit_within(full.overlay, 500), dtype=int)
    assert np.abs(np.asarray(bounded.overlay, dtype=int) - shrunk).mean() < 4
