"""The Serve application over real HTTP: routes, every bad-input class, uploads store, classify == evaluate.

One Serve instance (on the session's Ray, a free port) runs serve/app.py's build_app with a tiny real
timm model for this whole module; it is shut down at the end so later tests get the CPUs back.
"""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dermaid.classes import CLASS_CODES, DISCLAIMER, SITES
from dermaid.processes import free_port
from dermaid.uploads.store import clean_image

MAX_UPLOAD_MB = 1  # small here, so the streamed over-limit body stays small
GRPC_MAX_UPLOAD_MB = 0.01  # PNGs of the test pixels (~7 KB) reach the classifier over gRPC, BMPs (~21 KB) over actor calls


@pytest.fixture(scope="module")
def server(ray_session, tiny_checkpoint, tmp_path_factory):
    """(base URL, storage URL) of a running DermAID Serve app, started the way `dermaid serve` starts it."""
    from ray import serve

    from conftest import start_test_app

    storage = str(tmp_path_factory.mktemp("serve_uploads"))
    base = start_test_app(
        tiny_checkpoint, "dermaid-test", tmp_path_factory,
        f"max_upload_mb={MAX_UPLOAD_MB}", f"storage.url={storage}",
        "storage.uploads_per_client_per_hour=10000",  # the module stores ~60 uploads from 127.0.0.1 (limit: its own test)
        "explainer.concurrency=2", f"ingress.grpc_max_upload_mb={GRPC_MAX_UPLOAD_MB}",
        "ingress.docs=true",  # Swagger UI, as in development (off by default: tests/test_web.py)
        ready_s=120)
    yield base, storage
    serve.shutdown()


# --- images ------------------------------------------------------------------------------------------------

def _pixels(width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _valid_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    rgb = Image.fromarray(_pixels())
    gray16 = Image.fromarray(_pixels()[:, :, 0].astype(np.uint16) * 257)  # mode I;16
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    return {
        "jpeg": (_encode(rgb, "JPEG"), (96, 72)),
        "png": (_encode(rgb, "PNG"), (96, 72)),
        "webp": (_encode(rgb, "WEBP"), (96, 72)),
        "gif": (_encode(rgb.convert("P"), "GIF"), (96, 72)),
        "bmp": (_encode(rgb, "BMP"), (96, 72)),
        "tiff": (_encode(rgb, "TIFF"), (96, 72)),
        "grayscale": (_encode(rgb.convert("L"), "PNG"), (96, 72)),
        "palette": (_encode(rgb.convert("P", palette=Image.ADAPTIVE), "PNG"), (96, 72)),
        "rgba": (_encode(rgba, "PNG"), (96, 72)),
        "cmyk": (_encode(rgb.convert("CMYK"), "JPEG"), (96, 72)),
        "16bit": (_encode(gray16, "PNG"), (96, 72)),
        "exif_rotated": (_encode(rgb, "JPEG", exif=exif.tobytes()), (72, 96)),
    }


def _png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit PNG header declaring 100 MP, with a tiny compressed body."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (1 + width // 8) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _classify(base: str, data: bytes, filename: str = "lesion.jpg", content_type: str = "image/jpeg",
              **fields) -> requests.Response:
    return requests.post(f"{base}/v1/classify", files={"image": (filename, data, content_type)},
                         data={k: str(v) for k, v in fields.items()}, timeout=60)


def _error(response: requests.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


# --- routes ------------------------------------------------------------------------------------------------

def test_health_ready_model_and_docs(server):
    base, _ = server
    assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{base}/readyz", timeout=10).json()
    model = requests.get(f"{base}/v1/model", timeout=10).json()
    assert ready["status"] == "ready" and ready["model_version"] == model["model_version"]
    assert [c["code"] for c in model["card"]["classes"]] == list(CLASS_CODES)
    assert model["card"]["input"]["input_size"] == [3, 64, 64] and model["disclaimer"] == DISCLAIMER
    paths = requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/classify", "/v1/saliency", "/v1/model", "/healthz", "/readyz"} <= set(paths)
    assert requests.get(f"{base}/docs", timeout=10).status_code == 200


@pytest.mark.parametrize("kind", list(_valid_images()))
def test_classify_accepts_every_image_kind(server, kind):
    base, _ = server
    data, _size = _valid_images()[kind]
    response = _classify(base, data, age=55, sex="female", site="anterior torso")
    assert response.status_code == 200, response.text
    body = response.json()
    probs = [c["probability"] for c in body["probabilities"]]
    assert sorted(c["code"] for c in body["probabilities"]) == sorted(CLASS_CODES)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert body["top"] == body["probabilities"][0] and body["disclaimer"] == DISCLAIMER
    assert body["upload_id"] is None and body["stored"] is False
    assert body["triage"]["level"] in ("low", "moderate", "high") and body["triage"]["message"]
    malignant = sum(c["probability"] for c in body["probabilities"] if c["code"] in ("MEL", "BCC", "SCC"))
    assert body["malignancy_score"] == pytest.approx(malignant)


def test_content_decides_not_name_or_content_type(server):
    base, _ = server
    png, _ = _valid_images()["png"]
    assert _classify(base, png, filename="notes.txt", content_type="text/plain").status_code == 200
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    response = _classify(base, svg, filename="lesion.png", content_type="image/png")
    assert response.status_code == 415 and _error(response)["code"] == "unsupported_media_type"


def test_exif_orientation_is_honoured(server):
    base, _ = server
    exif_jpeg, _ = _valid_images()["exif_rotated"]
    upright = Image.open(io.BytesIO(exif_jpeg)).transpose(Image.Transpose.ROTATE_270)  # what a viewer shows
    a = _classify(base, exif_jpeg).json()["probabilities"]
    b = _classify(base, _encode(upright, "PNG")).json()["probabilities"]
    assert {c["code"]: c["probability"] for c in a} == pytest.approx({c["code"]: c["probability"] for c in b},
                                                                      abs=1e-6)
    saliency = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", exif_jpeg)}, timeout=60)
    assert Image.open(io.BytesIO(saliency.content)).size == (72, 96)


# --- bad input ---------------------------------------------------------------------------------------------

def _bad_images() -> dict[str, tuple[bytes, int, str]]:
    jpeg, _ = _valid_images()["jpeg"]
    ppm = _encode(Image.fromarray(_pixels()), "PPM")
    return {
        "empty": (b"", 400, "empty_image"),
        "truncated": (jpeg[: len(jpeg) // 2], 400, "undecodable_image"),
        "text": (b"hello, this is not an image at all", 415, "unsupported_media_type"),
        "svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>', 415,
                "unsupported_media_type"),
        "html": (b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>", 415,
                 "unsupported_media_type"),
        "unsupported_format": (ppm, 415, "unsupported_media_type"),
        "pixel_bomb": (_png_bomb(), 413, "image_too_large"),
        "thin_strip": (_encode(Image.new("RGB", (4000, 20)), "PNG"), 400, "invalid_image"),
    }


@pytest.mark.parametrize("kind", list(_bad_images()))
@pytest.mark.parametrize("route", ["/v1/classify", "/v1/saliency"])
def test_bad_images_get_a_clear_4xx(server, kind, route):
    base, _ = server
    data, status, code = _bad_images()[kind]
    response = requests.post(f"{base}{route}", files={"image": ("lesion.jpg", data, "image/jpeg")}, timeout=60)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code and len(error["message"]) > 5


@pytest.mark.parametrize("fields, field, allowed", [
    ({"age": "130"}, "age", "0 to 120"),
    ({"age": "-1"}, "age", "0 to 120"),
    ({"age": "old"}, "age", "0 to 120"),
    ({"sex": "x"}, "sex", "male, female"),
    ({"site": "toe"}, "site", SITES[0]),
    ({"consent": "maybe"}, "consent", "true or false"),
    ({"gender": "male"}, "gender", "age, sex, site"),  # a misspelt field is not dropped without a word
])
def test_bad_metadata_is_422_naming_field_and_allowed_values(server, fields, field, allowed):
    base, _ = server
    jpeg, _ = _valid_images()["jpeg"]
    response = _classify(base, jpeg, **fields)
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "invalid_field" and error["message"].startswith(f"{field}:")
    assert allowed in error["message"]


@pytest.mark.parametrize("fields, field", [({"target": "XYZ"}, "target"), ({"method": "scorecam"}, "method"),
                                           ({"format": "gif"}, "format")])
def test_bad_saliency_options_are_422(server, fields, field):
    base, _ = server
    jpeg, _ = _valid_images()["jpeg"]
    response = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", jpeg)}, data=fields, timeout=60)
    assert response.status_code == 422 and _error(response)["message"].startswith(f"{field}:")
    response = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", jpeg)}, data={"consent": "true"},
                             timeout=60)
    # consent is classify's field, not this route's
    assert response.status_code == 422 and _error(response)["fields"][0]["field"] == "consent"


def test_missing_image_wrong_method_unknown_route(server):
    base, _ = server
    response = requests.post(f"{base}/v1/classify", data={"age": "40"}, timeout=30)
    assert response.status_code == 422 and _error(response)["message"].startswith("image: required")
    response = requests.post(f"{base}/v1/classify", json={"image": "aGVsbG8="}, timeout=30)
    assert response.status_code == 422 and _error(response)["code"] == "invalid_field"
    assert requests.get(f"{base}/v1/classify", timeout=30).status_code == 405
    assert _error(requests.get(f"{base}/v1/nothing", timeout=30))["code"] == "not_found"


def _raw_http(port: int, head: bytes, body_chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request over a raw socket (body possibly unfinished); return (status, response body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        response = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            response += part
            if b"\r\n\r\n" in response and b'"error"' in response and response.rstrip().endswith(b"}"):
                break
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


def test_declared_oversize_body_is_413_before_it_is_sent(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    declared = 200 * 1024 * 1024  # 200 MB declared; only the headers are ever sent
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    status, body = _raw_http(port, head, [])
    assert status == 413 and b"body_too_large" in body


def test_streamed_oversize_body_is_413(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n"
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)]
    block = b"\xff" * 65536
    chunks += [b"%x\r\n%s\r\n" % (len(block), block)] * (MAX_UPLOAD_MB * 16 + 4)
    status, body = _raw_http(port, head, chunks)
    assert status == 413 and b"body_too_large" in body


def test_replica_stays_healthy_after_bad_input(server):
    base, _ = server
    for data, _status, _code in _bad_images().values():
        requests.post(f"{base}/v1/classify", files={"image": ("x", data)}, timeout=60)
    assert requests.get(f"{base}/readyz", timeout=10).status_code == 200
    jpeg, _ = _valid_images()["jpeg"]
    assert _classify(base, jpeg).status_code == 200


# --- saliency ----------------------------------------------------------------------------------------------

def test_saliency_png_has_the_input_size(server):
    base, _ = server
    data = _encode(Image.fromarray(_pixels(150, 100, seed=3)), "JPEG")
    response = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", data)}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.size == (150, 100)
    top = _classify(base, data).json()["top"]
    assert response.headers["x-dermaid-target"] == top["code"]
    # whoever reads the overlay, from the response or from a saved file, is told what it is not
    assert response.headers["x-dermaid-disclaimer"] == DISCLAIMER
    assert overlay.text["Disclaimer"] == DISCLAIMER and top["code"] in overlay.text["Description"]


def test_saliency_json_with_target_and_method(server):
    base, _ = server
    data = _encode(Image.fromarray(_pixels(120, 90, seed=4)), "PNG")
    response = requests.post(f"{base}/v1/saliency", files={"image": ("x.png", data)},
                             data={"format": "json", "target": "MEL", "method": "layercam", "age": "70"}, timeout=60)
    body = response.json()
    assert response.status_code == 200 and body["target"] == "MEL" and body["method"] == "layercam"
    assert body["name"] == "Melanoma" and 0 < body["probability"] < 1 and body["disclaimer"] == DISCLAIMER
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png_base64"]))).size == (120, 90)
    classified = {c["code"]: c["probability"] for c in _classify(base, data, age=70).json()["probabilities"]}
    assert body["probability"] == pytest.approx(classified["MEL"], abs=1e-6)


def test_concurrent_saliency_requests_are_independent(server):
    base, _ = server
    images = [_encode(Image.fromarray(_pixels(80 + 8 * i, 70, seed=20 + i)), "PNG") for i in range(4)]

    def call(data: bytes) -> np.ndarray:
        response = requests.post(f"{base}/v1/saliency", files={"image": ("x.png", data)}, timeout=60)
        return np.asarray(Image.open(io.BytesIO(response.content)), dtype=int)

    sequential = [call(d) for d in images]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(call, images))
    for a, b in zip(sequential, concurrent):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


# --- uploads store -----------------------------------------------------------------------------------------

def test_consent_stores_image_input_metadata_and_prediction(server):
    from dermaid.uploads.store import UploadStore

    base, storage = server
    store = UploadStore(storage)
    before = store.count()
    data, _ = _valid_images()["webp"]
    not_stored = _classify(base, data, age=33, consent="false").json()
    assert not_stored["upload_id"] is None and store.count() == before
    body = _classify(base, data, age=33, sex="male", site="palms/soles", consent="true").json()
    assert body["stored"] is True and store.count() == before + 1
    row = store.get(body["upload_id"])
    assert (row["age"], row["sex"], row["site"], row["image_format"]) == (33.0, "male", "palms/soles", "WEBP")
    assert row["model_version"] == body["model_version"] and row["top_class"] == body["top"]["code"]
    assert row["probabilities"] == pytest.approx({c["code"]: c["probability"] for c in body["probabilities"]})
    assert store.read_blob(row["blobs"]["image"]) == clean_image(data).data  # the pixels, without metadata
    assert Image.open(io.BytesIO(store.read_blob(row["blobs"]["input"]))).size == (64, 64)
    assert (Path(storage) / row["blobs"]["record"]).exists()


def test_a_failing_store_still_answers_and_counts_nothing(server):
    """Consent given but the blob store cannot be written: the prediction comes back with stored false,
    and no row appears (blobs are written before the row)."""
    from dermaid.uploads.store import BLOBS_DIR, UploadStore

    base, storage = server
    store = UploadStore(storage)
    before = store.count()
    blobs = Path(storage) / BLOBS_DIR
    aside = Path(storage) / "blobs-aside"
    if blobs.exists():
        blobs.rename(aside)
    blobs.write_bytes(b"a file where the blob directory belongs: every blob write fails")
    try:
        data, _ = _valid_images()["jpeg"]
        response = _classify(base, data, consent="true")
        assert response.status_code == 200
        body = response.json()
        assert body["stored"] is False and body["upload_id"] is None and body["top"]["code"] in CLASS_CODES
        assert store.count() == before
    finally:
        blobs.unlink()
        if aside.exists():
            aside.rename(blobs)
    assert _classify(base, data, consent="true").json()["stored"] is True and store.count() == before + 1


def test_fifty_concurrent_consented_uploads_are_all_stored(server):
    from dermaid.uploads.store import UploadStore

    base, storage = server
    store = UploadStore(storage)
    before = store.count()
    images = [_encode(Image.fromarray(_pixels(seed=100 + i)), "JPEG") for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda d: _classify(base, d, consent="true"), images))
    assert [r.status_code for r in responses] == [200] * 50
    ids = [r.json()["upload_id"] for r in responses]
    assert None not in ids and len(set(ids)) == 50
    assert store.count() == before + 50 and store.find_orphans() == []
    for upload_id, data in zip(ids, images):
        assert store.read_blob(store.get(upload_id)["blobs"]["image"]) == clean_image(data).data


def test_classify_is_the_same_over_grpc_and_over_actor_calls(server):
    """Uploads up to ingress.grpc_max_upload_mb reach the classifier over Serve's gRPC, larger ones over
    Ray actor calls: the same pixels give the same answer either way."""
    base, _ = server
    image = Image.fromarray(_pixels(seed=7))
    png, bmp = _encode(image, "PNG"), _encode(image, "BMP")
    assert len(png) < GRPC_MAX_UPLOAD_MB * 1024 * 1024 < len(bmp)
    over_grpc, over_actor = _classify(base, png), _classify(base, bmp)
    assert over_grpc.status_code == over_actor.status_code == 200
    probabilities = [{c["code"]: c["probability"] for c in r.json()["probabilities"]} for r in (over_grpc, over_actor)]
    assert probabilities[0] == pytest.approx(probabilities[1], abs=1e-6)


# --- one preprocessing path ----------------------------------------------------------------------------------

def test_classify_equals_dermaid_evaluate(server, tiny_checkpoint, toy_prepared, tmp_path):
    import pandas as pd

    from dermaid.config import compose
    from dermaid.data.loading import load_records
    from dermaid.evaluation.evaluate import evaluate

    base, _ = server
    prepared_dir, version = toy_prepared.rstrip("/").rsplit("/", 1)
    cfg = compose("evaluate", [f"checkpoint={tiny_checkpoint}", f"data.prepared_dir={prepared_dir}",
                               f"data.version={version}", "split=val", f"out={tmp_path}", "device=cpu"])
    result = evaluate(cfg)
    predictions = pd.read_csv(Path(result["out"]) / "predictions.csv").set_index("image")
    records = load_records(toy_prepared, split="val", fold=int(cfg.data.fold)).head(6)
    for record in records.itertuples():
        fields = {k: v for k, v in (("age", record.age), ("sex", record.sex), ("site", record.site))
                  if v is not None and not (isinstance(v, float) and np.isnan(v))}
        body = _classify(base, record.image, **fields).json()
        served = {c["code"]: c["probability"] for c in body["probabilities"]}
        expected = predictions.loc[record.image_id, list(CLASS_CODES)].to_dict()
        assert served == pytest.approx(expected, abs=1e-5)


# --- a compressed variant -------------------------------------------------------------------------------------

def test_an_onnx_variant_classifies_and_gets_grad_cam_from_its_float_source(server, tiny_checkpoint, tmp_path):
    """The classifier runs the ONNX export; the explainer finds the float checkpoint it was made from."""
    from ray import serve

    from dermaid.compress.export import run_export
    from dermaid.config import compose
    from serve.app import build_app
    from serve.args import AppArgs

    base, _ = server
    onnx = str(tmp_path / "best-onnx")
    run_export(compose("export", [f"checkpoint={tiny_checkpoint}", f"out={onnx}", "format=onnx"]))
    args = AppArgs.model_validate({
        "checkpoint": onnx, "storage": {"url": str(tmp_path / "uploads")},
        "classifier": {"num_cpus": 0.25, "torch_threads": 1, "forward_lanes": 1},
        "explainer": {"num_cpus": 0.25, "torch_threads": 1}, "ingress": {"num_cpus": 0.1},
    })
    serve.run(build_app(args), name="dermaid-onnx", route_prefix="/onnx")
    try:
        card = requests.get(f"{base}/onnx/v1/model", timeout=30).json()["card"]
        assert card["kind"] == "onnx" and "compression" not in card  # its source path: /v1/review/model only
        images = _valid_images()
        for kind in ("jpeg", "png", "rgba"):
            data, size = images[kind]
            served = {c["code"]: c["probability"] for c in _classify(f"{base}/onnx", data).json()["probabilities"]}
            float_model = {c["code"]: c["probability"] for c in _classify(base, data).json()["probabilities"]}
            assert served == pytest.approx(float_model, abs=1e-4)  # the export check's tolerance is on logits
            response = requests.post(f"{base}/onnx/v1/saliency", files={"image": ("x", data)}, timeout=60)
            assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == size
    finally:
        serve.delete("dermaid-onnx")


# --- abstention: the OOD detector of a calibrated checkpoint -----------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_app(server, calibrated_checkpoint, tmp_path_factory):
    """(base URL, checkpoint, storage) of a second app on the module's Serve, serving conftest's
    calibrated_checkpoint (trained and calibrated); the module's own app stays uncalibrated."""
    from ray import serve

    from serve.app import build_app
    from serve.args import AppArgs

    base, _ = server
    storage = str(tmp_path_factory.mktemp("serve_calibrated_uploads"))
    args = AppArgs.model_validate({
        "checkpoint": calibrated_checkpoint, "storage": {"url": storage},
        "classifier": {"num_cpus": 0.25, "torch_threads": 1, "forward_lanes": 1},
        "explainer": {"num_cpus": 0.25, "torch_threads": 1}, "ingress": {"num_cpus": 0.1},
    })
    serve.run(build_app(args), name="dermaid-ood", route_prefix="/ood")
    yield f"{base}/ood", calibrated_checkpoint, storage
    serve.delete("dermaid-ood")


def _document_jpeg() -> bytes:
    from dermaid.data.synth_ood import iter_ood_images

    return next(data for _kind, data in iter_ood_images(1, seed=3, size=(320, 240), kinds=("document",)))


def test_a_document_abstains_with_the_retake_message_a_familiar_lesion_is_answered(calibrated_app, toy_prepared):
    from dermaid.data.loading import load_records
    from dermaid.inference import RETAKE_MESSAGE, Predictor
    from dermaid.models.card import load_card

    base, checkpoint, _ = calibrated_app
    card = load_card(checkpoint)
    model = requests.get(f"{base}/v1/model", timeout=30).json()
    assert model["ood"] == {key: card.ood[key] for key in ("method", "threshold", "refuse_share")}
    assert model["triage"] == card.triage and "ood" not in model["card"]  # statistics etc.: /v1/review/model

    document = _document_jpeg()
    refused = _classify(base, document, age=40)
    assert refused.status_code == 200, refused.text
    body = refused.json()
    assert body["abstain"] is True and body["ood_score"] > card.ood["threshold"]
    assert body["message"] == RETAKE_MESSAGE and body["disclaimer"] == DISCLAIMER
    assert body["top"] is None and body["triage"] is None and body["malignancy_score"] is None
    assert body["probabilities_reliable"] is False
    assert sum(c["probability"] for c in body["probabilities"]) == pytest.approx(1.0, abs=1e-6)

    # a training lesion the model itself scores in-distribution (in this process, the same Predictor)
    lesions = load_records(toy_prepared, split="train", fold=0).head(12)["image"].tolist()
    batch = Predictor(checkpoint).predict_full([(data, None, None, None) for data in lesions])
    assert batch.abstain.mean() <= 0.5  # mostly answered
    familiar = int(np.argmin(batch.ood_scores))
    answered = _classify(base, lesions[familiar]).json()
    assert answered["abstain"] is False
    assert answered["ood_score"] == pytest.approx(batch.ood_scores[familiar], abs=1e-4)
    assert answered["message"] is None and answered["probabilities_reliable"] is True
    high = answered["malignancy_score"] >= card.triage["cutoff"]  # the card's operating point, not the fixed 0.5
    assert answered["top"]["code"] in CLASS_CODES and (answered["triage"]["level"] == "high") == high


def test_saliency_and_a_stored_upload_carry_abstain(calibrated_app):
    import json

    from dermaid.inference import RETAKE_MESSAGE
    from dermaid.uploads.store import UploadStore

    base, _, storage = calibrated_app
    document = _document_jpeg()
    files = {"image": ("doc.jpg", document, "image/jpeg")}
    png = requests.post(f"{base}/v1/saliency", files=files, timeout=60)
    assert png.status_code == 200 and png.headers["X-DermAID-Abstain"] == "true"
    body = requests.post(f"{base}/v1/saliency", files=files, data={"format": "json"}, timeout=60).json()
    assert body["abstain"] is True and body["message"] == RETAKE_MESSAGE and body["probabilities_reliable"] is False
    assert body["ood_score"] == pytest.approx(float(png.headers["X-DermAID-OOD-Score"]), abs=1e-5)

    stored = _classify(base, document, consent="true").json()
    assert stored["stored"] is True and stored["abstain"] is True
    store = UploadStore(storage)
    record = json.loads(store.read_blob(store.get(stored["upload_id"])["blobs"]["record"]))
    assert record["abstain"] is True and record["ood_score"] == pytest.approx(stored["ood_score"])


def test_an_uncalibrated_checkpoint_serves_with_null_ood_and_says_how_to_add_it(server):
    base, _ = server
    model = requests.get(f"{base}/v1/model", timeout=30).json()
    assert model["ood"]["missing"] is True and "dermaid calibrate" in model["ood"]["how"]
    assert model["triage"] is None and "ood" not in model["card"]
    data, _ = _valid_images()["jpeg"]
    body = _classify(base, data).json()
    assert body["ood_score"] is None and body["abstain"] is None and body["message"] is None
    assert body["probabilities_reliable"] is True and body["top"]["code"] in CLASS_CODES
    png = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", data)}, timeout=60)
    assert (png.headers["X-DermAID-OOD-Score"], png.headers["X-DermAID-Abstain"]) == ("null", "null")
    saliency = requests.post(f"{base}/v1/saliency", files={"image": ("x.jpg", data)}, data={"format": "json"},
                             timeout=60).json()
    assert saliency["ood_score"] is None and saliency["abstain"] is None and saliency["probabilities_reliable"]


# --- the demo's last step -------------------------------------------------------------------------------------

def test_demo_serve_step_with_demo_serve_0(tiny_checkpoint, toy_raw, toy_prepared, tmp_path, monkeypatch, capsys):
    from dermaid.config import compose, to_plain
    from dermaid.demo import step_serve

    monkeypatch.setenv("DEMO_SERVE", "0")
    config = to_plain(compose("demo", [f"paths.root={tmp_path}", f"data.root={toy_raw}"]))  # the demo's own config
    state = {"overrides": [f"paths.root={tmp_path}"], "config": config, "trained": {"checkpoint": tiny_checkpoint},
             "version_url": toy_prepared}
    step_serve(state)
    out = capsys.readouterr().out
    assert state["saliency_png"].startswith(str(tmp_path)) and Path(state["saliency_png"]).exists()
    image_line = next(line for line in out.splitlines() if "DEMO_SERVE=0:" in line)
    raw = image_line.split("DEMO_SERVE=0: ", 1)[1].split(" (age", 1)[0]
    assert Image.open(state["saliency_png"]).size == Image.open(raw).size
    assert "malignancy score" in out and DISCLAIMER in out
    assert state["serve_result"]["top"]["code"] in CLASS_CODES


# --- `dermaid serve` as users start it --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _ingress_logs_naming(port: int) -> list[Path]:
    """Serve replica logs of any local Ray on this machine whose Ingress started an HTTP server on `port`."""
    import tempfile

    logs = Path(tempfile.gettempdir(), "ray").glob("session_*/logs/serve/replica_*Ingress*.log")
    return [log for log in logs if f"HTTP server on port {port}" in log.read_text(errors="replace")]


def _launch_dermaid_serve(checkpoint: str, tmp_path: Path, port: int, *overrides: str):
    """`dermaid serve` as a user starts it (its own Ray, stdout unbuffered into a log): (process, log path)."""
    import os
    import subprocess

    from dermaid.processes import start_process_group

    log_path = tmp_path / "serve.log"
    cmd = [str(REPO / ".venv/bin/dermaid"), "serve", f"checkpoint={checkpoint}", f"port={port}",
           f"storage.url={tmp_path}/uploads", f"hydra.run.dir={tmp_path}/hydra", *overrides]
    with open(log_path, "wb") as log:
        proc = start_process_group(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"})
    return proc, log_path


@pytest.mark.integration(reason="`dermaid serve` in a subprocess: its own Ray and Serve")
def test_dermaid_serve_command_answers_on_its_port_from_the_ingress_replica(tiny_checkpoint, tmp_path):
    """The CLI path: its own Ray; the Ingress replica itself listens on `port` (direct ingress, no proxy hop);
    good and bad requests answered there; Ctrl-C stops everything."""
    import signal

    from dermaid.processes import stop_process_group

    port = free_port()
    proc, log_path = _launch_dermaid_serve(tiny_checkpoint, tmp_path, port,
                                           "classifier.torch_threads=1", "explainer.torch_threads=1")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"dermaid serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"dermaid serve never became ready:\n{log_path.read_text()[-3000:]}"
            try:
                # ready, and the command has finished starting (direct ingress answers before serve.run returns)
                if (requests.get(f"{base}/readyz", timeout=10).status_code == 200
                        and "DermAID is serving at" in log_path.read_text()):
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        assert _ingress_logs_naming(port), "the Ingress replica did not start its own HTTP server on the port"
        ok = requests.post(f"{base}/v1/classify", files={"image": ("a.png", _encode(Image.fromarray(_pixels()), "PNG"))},
                           data={"age": "40", "site": SITES[0]}, timeout=60)
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert len(body["probabilities"]) == len(CLASS_CODES) and body["disclaimer"] == DISCLAIMER
        bad = requests.post(f"{base}/v1/classify", files={"image": ("a.jpg", b"<html>not an image</html>")}, timeout=60)
        assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_media_type"
    finally:
        stop_process_group(proc, signal.SIGINT, timeout_s=90)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/healthz", timeout=5)


@pytest.mark.integration(reason="`dermaid serve` in a subprocess: its own Ray")
def test_ctrl_c_while_dermaid_serve_starts_is_one_line(tiny_checkpoint, tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) once Ray is up but before
    the app is: the command says so in one line and exits 130, no traceback."""
    import signal

    from dermaid.processes import stop_process_group

    proc, log_path = _launch_dermaid_serve(tiny_checkpoint, tmp_path, free_port())
    try:
        deadline = time.time() + 300
        while "Started a local Ray instance" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, f"dermaid serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, "Ray never started"
            time.sleep(0.2)
    finally:
        stop_process_group(proc, signal.SIGINT, timeout_s=90)
    out = log_path.read_text(errors="replace")
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted (Ctrl-C)" in out and "DermAID is serving at" not in out
    assert "Traceback" not in out, out[-3000:]


def test_demo_serve_step_refuses_a_document_with_a_calibrated_model(calibrated_checkpoint, toy_raw, toy_prepared,
                                                                    tmp_path, monkeypatch, capsys):
    from dermaid.config import compose, to_plain
    from dermaid.demo import step_serve

    monkeypatch.setenv("DEMO_SERVE", "0")
    config = to_plain(compose("demo", [f"paths.root={tmp_path}", f"data.root={toy_raw}"]))
    state = {"overrides": [f"paths.root={tmp_path}"], "config": config,
             "trained": {"checkpoint": calibrated_checkpoint}, "version_url": toy_prepared}
    step_serve(state)
    out = capsys.readouterr().out
    refused = next(line for line in out.splitlines() if "a photo of a document" in line)
    assert "abstain=True" in refused and "Retake" in refused, out
    assert state["serve_result"]["abstain"] in (True, False) and state["serve_result"]["ood_score"] is not None



# --- what the public may store: rate limit per client, daily quota, duplicates (serve/quotas.py) ---------------

LIMITED_PER_HOUR = 2
LIMITED_QUOTA_MB = 0.1  # a few of these tests' uploads (photo + model input + record, ~15-20 KB each)
REQUESTS_PER_MINUTE = 8  # every request of one client (ingress.requests_per_client_per_minute); the tests below send fewer


@pytest.fixture()
def limited_app(server, tiny_checkpoint, tmp_path):
    """(base URL, storage) of a second app on the module's Serve with tight storage limits, behind a "proxy"
    (127.0.0.1 is trusted, so X-Forwarded-For names the client); deleted after its test."""
    from ray import serve

    from serve.app import build_app
    from serve.args import AppArgs

    base, _ = server
    storage = str(tmp_path / "limited_uploads")
    args = AppArgs.model_validate({
        "checkpoint": tiny_checkpoint, "max_upload_mb": MAX_UPLOAD_MB,
        "storage": {"url": storage, "uploads_per_client_per_hour": LIMITED_PER_HOUR,
                    "daily_quota_mb": LIMITED_QUOTA_MB, "trusted_proxies": ["127.0.0.0/8", "::1"]},
        "classifier": {"num_cpus": 0.1, "torch_threads": 1, "forward_lanes": 1},
        "explainer": {"num_cpus": 0.05, "torch_threads": 1},
        "ingress": {"num_cpus": 0.05, "requests_per_client_per_minute": REQUESTS_PER_MINUTE},
    })
    serve.run(build_app(args), name="dermaid-limited", route_prefix="/limited")
    yield f"{base}/limited", storage
    serve.delete("dermaid-limited")


def _from(client: str, base: str, data: bytes, **fields) -> requests.Response:
    """A classify request as a proxy forwards it for `client` (the header our trusted 127.0.0.1 peer sets)."""
    return requests.post(f"{base}/v1/classify", files={"image": ("lesion.jpg", data, "image/jpeg")},
                         data={k: str(v) for k, v in fields.items()},
                         headers={"X-Forwarded-For": f"198.51.100.250, {client}"}, timeout=60)


def _refusal(response: requests.Response, reason: str) -> int:
    """A 429 in the one JSON error shape, naming `reason`, with Retry-After: its seconds."""
    assert response.status_code == 429, response.text
    error = _error(response)
    assert error["code"] == "too_many_requests" and error["reason"] == reason
    assert "without consent" in error["message"]
    assert int(response.headers["Retry-After"]) == error["retry_after_s"] >= 1
    return error["retry_after_s"]


def _lesion_jpeg(seed: int) -> bytes:
    return _encode(Image.fromarray(_pixels(seed=seed)), "JPEG")


def _wait_for_metric(name: str, labels: dict[str, str], accept, timeout_s: float = 60.0) -> list[float]:
    """The values of Ray's Prometheus export series `ray_<name>` with these labels, once `accept(values)` holds
    (replicas report every few seconds)."""
    import re

    import ray

    url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
    pattern = re.compile(rf"^ray_{name}{{(.*)}} (\S+)$")
    deadline, values = time.time() + timeout_s, []
    while time.time() < deadline:
        values = []
        for line in requests.get(url, timeout=10).text.splitlines():
            match = pattern.match(line)
            if match and all(f'{key}="{value}"' in match.group(1) for key, value in labels.items()):
                values.append(float(match.group(2)))
        if accept(values):
            return values
        time.sleep(2)
    raise AssertionError(f"ray_{name}{labels}: {values} after {timeout_s} s")


def test_consented_uploads_are_limited_per_client_and_classification_is_not(limited_app):
    from dermaid.uploads.store import UploadStore

    base, storage = limited_app
    stored = [_from("203.0.113.7", base, _lesion_jpeg(900 + i), consent="true") for i in range(LIMITED_PER_HOUR)]
    assert [r.status_code for r in stored] == [200] * LIMITED_PER_HOUR and all(r.json()["stored"] for r in stored)
    store = UploadStore(storage)
    assert store.count() == LIMITED_PER_HOUR

    retry = _refusal(_from("203.0.113.7", base, _lesion_jpeg(910), consent="true"), "rate_limit")
    assert 3500 < retry <= 3600 and store.count() == LIMITED_PER_HOUR  # the moving hour's first upload ages out
    assert _from("203.0.113.7", base, _lesion_jpeg(910)).status_code == 200  # without consent: classified
    other = _from("203.0.113.8", base, _lesion_jpeg(911), consent="true")  # another client has its own limit
    assert other.status_code == 200 and other.json()["stored"] is True and store.count() == LIMITED_PER_HOUR + 1

    # the client the proxy names counts, not the first (client-written) entry of the header
    forged = requests.post(f"{base}/v1/classify", files={"image": ("x.jpg", _lesion_jpeg(912), "image/jpeg")},
                           data={"consent": "true"}, headers={"X-Forwarded-For": "203.0.113.99, 203.0.113.7"},
                           timeout=60)
    _refusal(forged, "rate_limit")
    _wait_for_metric("dermaid_uploads_refused_total", {"application": "dermaid-limited", "reason": "rate_limit"},
                     lambda values: sum(values) >= 2)


def test_a_client_past_its_request_limit_gets_429_before_its_upload_is_read(limited_app):
    """ingress.requests_per_client_per_minute: every request of one client counts (not the probes), the refusal comes
    before the body is read (an upload over max_upload_mb gets 429, not 413), another client is not affected."""
    base, _ = limited_app
    client = {"X-Forwarded-For": "203.0.113.40"}
    assert all(requests.get(f"{base}/readyz", headers=client, timeout=30).status_code == 200 for _ in range(10))
    answers = [_from("203.0.113.40", base, _lesion_jpeg(930)) for _ in range(REQUESTS_PER_MINUTE)]
    assert [r.status_code for r in answers] == [200] * REQUESTS_PER_MINUTE

    refused = requests.post(f"{base}/v1/classify", data=b"x" * ((MAX_UPLOAD_MB + 1) << 20), headers=client, timeout=60)
    assert refused.status_code == 429, refused.text
    error = _error(refused)
    assert error["code"] == "too_many_requests" and error["reason"] == "rate_limit"
    assert f"{REQUESTS_PER_MINUTE} requests in the last minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) == error["retry_after_s"] <= 60
    assert requests.get(f"{base}/v1/privacy", headers=client, timeout=30).status_code == 429  # every public route
    assert requests.get(f"{base}/healthz", headers=client, timeout=30).status_code == 200     # never the probes
    assert _from("203.0.113.41", base, _lesion_jpeg(930)).status_code == 200                 # another client


def test_the_request_limit_skips_probes_and_the_review_api_and_is_off_by_default():
    """serve/quotas.py on a plain FastAPI app (no Ray): one client's budget; the probes and /v1/review/... are
    never counted; without a RequestLimit (the default) nothing is refused."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.errors import add_error_handling
    from serve.quotas import RequestLimit, RequestLimitMiddleware

    limit: list[RequestLimit | None] = [RequestLimit(2, [])]
    app = FastAPI()
    add_error_handling(app, max_bytes=lambda: 1 << 20)
    app.add_middleware(RequestLimitMiddleware, limit=lambda: limit[0])
    for path in ("/readyz", "/healthz", "/v1/review/queue", "/v1/model"):
        app.get(path)(lambda: {"ok": True})
    client = TestClient(app)

    assert [client.get("/v1/model").status_code for _ in range(3)] == [200, 200, 429]
    assert client.get("/v1/model").json()["error"]["reason"] == "rate_limit"
    assert all(client.get(path).status_code == 200 for path in ("/readyz", "/healthz", "/v1/review/queue") * 3)
    limit[0] = None
    assert all(client.get("/v1/model").status_code == 200 for _ in range(5))


def test_an_exact_duplicate_is_stored_once_and_hands_out_no_earlier_reference(limited_app):
    from dermaid.uploads.store import UploadStore

    base, storage = limited_app
    photo = _lesion_jpeg(920)
    first = _from("203.0.113.20", base, photo, age=40, consent="true").json()
    again = _from("203.0.113.21", base, photo, age=70, sex="female", consent="true").json()
    assert first["stored"] is again["stored"] is True and first["upload_id"] and first["lookup_token"]
    # another sender of the same photo gets neither the first sender's reference nor a token to it
    assert (again["duplicate"], again["upload_id"], again["lookup_token"]) == (True, None, None)
    assert len(again["probabilities"]) == len(CLASS_CODES)  # classified as usual, with its own metadata
    store = UploadStore(storage)
    assert store.count() == 1 and store.get(first["upload_id"])["age"] == 40.0  # the first upload's metadata stay
    assert len(list((Path(storage) / "blobs").iterdir())) == 1


def test_the_daily_quota_refuses_storing_until_midnight_utc(limited_app):
    from dermaid.uploads.store import UploadStore
    from serve.quotas import seconds_to_midnight, today

    base, storage = limited_app
    quota = LIMITED_QUOTA_MB * 1024 * 1024
    statuses = []
    for i in range(40):  # one upload per client: only the quota can refuse
        response = _from(f"203.0.113.{100 + i}", base, _lesion_jpeg(930 + i), consent="true")
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) == {200} and len(statuses) > 2, statuses
    retry = _refusal(response, "daily_quota")
    assert abs(retry - seconds_to_midnight()) < 30
    on_disk = sum(f.stat().st_size for f in (Path(storage) / "blobs").rglob("*") if f.is_file())
    per_upload = on_disk / (len(statuses) - 1)
    assert quota - 2 * per_upload < on_disk <= quota + per_upload  # stopped at the quota, not before
    assert UploadStore(storage).stored_bytes(today()) == on_disk
    _refusal(_from("203.0.113.250", base, _lesion_jpeg(960), consent="true"), "daily_quota")  # any client
    _wait_for_metric("dermaid_uploads_stored_bytes_today", {"application": "dermaid-limited"},
                     lambda values: on_disk in values)
    _wait_for_metric("dermaid_uploads_refused_total", {"application": "dermaid-limited", "reason": "daily_quota"},
                     lambda values: sum(values) >= 2)
    assert _from("203.0.113.250", base, _lesion_jpeg(960)).status_code == 200  # classification goes on


def test_the_client_address_is_the_peer_unless_a_trusted_proxy_names_it():
    import ipaddress

    from starlette.requests import Request

    from serve.quotas import client_key

    def request(peer: str, *forwarded: str) -> Request:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 5000)})

    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert client_key(request("203.0.113.7", "198.51.100.1"), trusted) == "203.0.113.7"  # untrusted peer: header ignored
    assert client_key(request("203.0.113.7", "198.51.100.1"), []) == "203.0.113.7"
    assert client_key(request("10.1.2.3", "198.51.100.1, 203.0.113.9"), trusted) == "203.0.113.9"
    assert client_key(request("10.1.2.3", "198.51.100.1, 203.0.113.9, 10.4.4.4"), trusted) == "203.0.113.9"
    assert client_key(request("10.1.2.3", "198.51.100.1", "203.0.113.9"), trusted) == "203.0.113.9"  # two headers
    assert client_key(request("10.1.2.3"), trusted) == "10.1.2.3"  # a proxy that names nobody
    assert client_key(request("2001:db8:1:2:aaaa::1"), trusted) == "2001:db8:1:2::/64"  # one subscriber's block
    assert client_key(request("2001:db8:1:2:bbbb::9"), trusted) == client_key(request("2001:db8:1:2::5"), trusted)
    assert client_key(request("::ffff:203.0.113.7"), trusted) == "203.0.113.7"


# --- what the public API says (issue #18): Swagger UI only when asked for, the card's public part --------------

def test_swagger_ui_when_turned_on_and_the_public_model_card(server):
    """ingress.docs=true (this module's app, as in development) serves FastAPI's Swagger page for this app's
    schema (off by default: tests/test_web.py); /v1/model shows only the card's public part."""
    base, _ = server
    docs = requests.get(f"{base}/docs", timeout=10)
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "url: '/openapi.json'" in docs.text and "swagger-ui" in docs.text
    assert "/docs" not in requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    card = requests.get(f"{base}/v1/model", timeout=10).json()["card"]
    assert card["architecture"] == "test_efficientnet" and card["input"]["input_size"] == [3, 64, 64]
    assert "not a diagnosis" in card["intended_use"].lower()
    assert not {"config", "code_version", "model", "artifact", "created", "dataset_version", "compression"} & set(card)


# --- the cost of an image (issue #18 item 3) -------------------------------------------------------------------------

def test_saliency_refuses_an_image_over_its_pixel_limit_that_classify_accepts(server):
    """A valid 1-bit PNG of 36 MP is a few KB: under classify's max_pixels (50 MP), over saliency_max_pixels (25 MP),
    whose overlay would be the costly part; saliency says so in a clear 413 before drawing anything."""
    from serve.args import AppArgs

    base, _ = server
    side = 6000
    limits = {name: AppArgs.model_fields[name].default for name in ("saliency_max_pixels", "max_pixels")}
    assert limits["saliency_max_pixels"] < side * side < limits["max_pixels"]
    data = _encode(Image.new("1", (side, side), 1), "PNG")
    assert len(data) < 100_000
    classified = _classify(base, data, "big.png", "image/png")
    assert classified.status_code == 200, classified.text
    assert len(classified.json()["probabilities"]) == len(CLASS_CODES)
    response = requests.post(f"{base}/v1/saliency", files={"image": ("big.png", data, "image/png")},
                             data={"format": "json"}, timeout=120)
    assert response.status_code == 413, response.text
    error = _error(response)
    assert error["code"] == "image_too_large" and "limit is 25000000" in error["message"]


def test_a_big_photos_overlay_comes_back_bounded_and_full_size_only_when_asked(server):
    base, _ = server
    data = _encode(Image.fromarray(_pixels(3000, 2000, seed=8)), "JPEG", quality=80)  # 6 MP, well under 1 MB
    files = {"image": ("big.jpg", data, "image/jpeg")}
    bounded = requests.post(f"{base}/v1/saliency", files=files, data={"format": "json"}, timeout=120).json()
    assert (bounded["width"], bounded["height"]) == (2048, 1365)  # overlay_max_side on the long side, aspect kept
    assert Image.open(io.BytesIO(base64.b64decode(bounded["overlay_png_base64"]))).size == (2048, 1365)
    png = requests.post(f"{base}/v1/saliency", files=files, timeout=120)
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (2048, 1365)
    full = requests.post(f"{base}/v1/saliency", files=files, data={"format": "json", "full_size": "true"},
                         timeout=120).json()
    assert (full["width"], full["height"]) == (3000, 2000)
    assert Image.open(io.BytesIO(base64.b64decode(full["overlay_png_base64"]))).size == (3000, 2000)
    assert full["target"] == bounded["target"]
    assert full["probability"] == pytest.approx(bounded["probability"], abs=1e-9)
    assert len(full["overlay_png_base64"]) > 1.5 * len(bounded["overlay_png_base64"])
