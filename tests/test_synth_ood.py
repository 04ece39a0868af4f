"""dermaid.data.synth_ood: the out-of-distribution photo set (`dermaid synth kind=ood`).

Real drawings, real JPEGs; the toy lesions they are compared with come from dermaid.data.synth.
"""

from __future__ import annotations

import io
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dermaid.data.isic import read_isic2019
from dermaid.data.synth import IMAGE_SIZES, generate
from dermaid.data.synth_ood import (
    MANIFEST_FILE, OOD_KINDS, generate_ood, generate_ood_image, iter_ood_images, read_ood_set,
)
from dermaid.errors import DermaidError
from dermaid.files import get_fs, join, read_bytes

N_PER_KIND = 2


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ood") / "set"
    summary = generate_ood(str(out), n_per_kind=N_PER_KIND, seed=0)
    assert summary["counts"] == {kind: N_PER_KIND for kind in OOD_KINDS} and not summary["reused"]
    return out


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory) -> list[Image.Image]:
    """Eight toy lesions, one per class, exactly as `dermaid synth` writes them."""
    out = tmp_path_factory.mktemp("toy") / "toy"
    generate(str(out), n=8, seed=0)
    return [_open(url) for url in read_isic2019(str(out))["image_url"]]


def _open(url: str) -> Image.Image:
    img = Image.open(io.BytesIO(read_bytes(url)))
    img.load()
    return img


def _by_kind(ood_dir: Path) -> dict[str, list[Image.Image]]:
    images: dict[str, list[Image.Image]] = {}
    for url, kind in read_ood_set(str(ood_dir)):
        images.setdefault(kind, []).append(_open(url))
    return images


def _grey(img: Image.Image, side: int = 128) -> np.ndarray:
    return np.asarray(img.convert("L").resize((side, side), Image.BILINEAR), np.float32) / 255.0  # (side, side)


def _local_variation(img: Image.Image) -> float:
    """Mean |pixel - its 3x3 neighbourhood| at 128 px (what the model sees): ~0 for flat pictures."""
    grey = img.convert("L").resize((128, 128), Image.BILINEAR)
    a = np.asarray(grey, np.float32) / 255.0
    b = np.asarray(grey.filter(ImageFilter.BoxBlur(1)), np.float32) / 255.0
    return float(np.abs(a - b)[2:-2, 2:-2].mean())


def _neutral_white(img: Image.Image) -> float:
    """Share of paper-like pixels at 128 px: bright and colourless (skin is bright but tinted)."""
    rgb = np.asarray(img.convert("RGB").resize((128, 128), Image.BILINEAR), np.float32) / 255.0  # (128, 128, 3)
    low, high = rgb.min(2), rgb.max(2)
    return float(((low > 0.8) & (high - low < 0.12)).mean())


def _blown_out(img: Image.Image) -> float:
    """Share of pixels clipped in every channel at 128 px."""
    rgb = np.asarray(img.convert("RGB").resize((128, 128), Image.BILINEAR), np.float32) / 255.0  # (128, 128, 3)
    return float((rgb.min(2) > 0.97).mean())


def _contrast(img: Image.Image) -> float:
    """Spread of brightness at 32 px (p99 - p1): a lesion on skin has one, bare skin hardly."""
    g = _grey(img, 32)
    return float(np.percentile(g, 99) - np.percentile(g, 1))


def test_every_kind_has_n_images_in_the_manifest(ood_dir):
    rows = read_ood_set(str(ood_dir))
    assert Counter(kind for _, kind in rows) == {kind: N_PER_KIND for kind in OOD_KINDS}
    assert (ood_dir / MANIFEST_FILE).read_text().splitlines()[0] == "image,kind"
    for url, kind in rows:
        assert Path(url).parent.name == kind and Path(url).name in {f"{kind}_{i}.jpg" for i in range(N_PER_KIND)}
    files = sorted(p.relative_to(ood_dir).as_posix() for p in ood_dir.rglob("*.jpg"))
    assert files == sorted(Path(url).relative_to(ood_dir).as_posix() for url, _ in rows)  # nothing unlisted
    images = [_open(url) for url, _ in rows]
    assert {img.format for img in images} == {"JPEG"} and {img.mode for img in images} == {"RGB"}
    assert {img.size for img in images} <= set(IMAGE_SIZES)  # the toy set's size range
    assert len({img.size for img in images}) >= 3
    assert generate_ood(str(ood_dir), n_per_kind=N_PER_KIND, seed=0)["reused"]
    with pytest.raises(DermaidError, match="overwrite"):
        generate_ood(str(ood_dir), n_per_kind=N_PER_KIND + 1, seed=0)


def test_deterministic_for_a_seed():
    first = list(iter_ood_images(1, seed=3, size=(160, 120)))
    assert [kind for kind, _ in first] == list(OOD_KINDS)
    assert first == list(iter_ood_images(1, seed=3, size=(160, 120)))  # same bytes twice
    other = dict(iter_ood_images(1, seed=4, size=(160, 120)))
    assert all(other[kind] != data for kind, data in first)
    assert {Image.open(io.BytesIO(data)).size for _, data in first} == {(160, 120)}
    img = generate_ood_image("object", np.random.default_rng(0), (200, 150))
    assert img.mode == "RGB" and img.size == (200, 150)
    with pytest.raises(DermaidError, match="unknown kind.*document"):
        generate_ood_image("cat", np.random.default_rng(0), (64, 64))


def test_read_ood_set_round_trip_on_memory():
    url = f"memory://ood-{uuid.uuid4().hex}"
    try:
        generate_ood(url, n_per_kind=1, seed=0, kinds=("document", "bare_skin"), workers=1)
        rows = read_ood_set(url)
        assert rows == [(join(url, "document/document_0.jpg"), "document"),
                        (join(url, "bare_skin/bare_skin_0.jpg"), "bare_skin")]
        assert dict(iter_ood_images(1, seed=0, size=_open(rows[0][0]).size, kinds=("document",)))["document"] \
            == read_bytes(rows[0][0])  # the in-memory images are the written ones
        with pytest.raises(DermaidError, match="dermaid synth kind=ood"):
            read_ood_set(f"{url}-missing")
        with pytest.raises(DermaidError, match="unknown kind"):
            generate_ood(f"{url}-bad", n_per_kind=1, seed=0, kinds=("document", "selfie"))
    finally:
        fs, path = get_fs(url)
        fs.rm(path, recursive=True)


def test_kinds_differ_from_toy_lesions(ood_dir, toy_images):
    images = _by_kind(ood_dir)
    toy_variation = [_local_variation(img) for img in toy_images]
    toy_white = [_neutral_white(img) for img in toy_images]
    toy_contrast = sorted(_contrast(img) for img in toy_images)
    for kind in ("flat", "gradient", "blurred_lesion"):  # smooth: far less local detail than any toy lesion
        assert max(_local_variation(img) for img in images[kind]) < 0.5 * min(toy_variation), kind
    assert min(_local_variation(img) for img in images["noise"]) > 2 * max(toy_variation)
    for img in images["document"]:  # mostly near-white paper with dark strokes of text
        assert _neutral_white(img) > max(0.5, max(toy_white) + 0.4)
        full = np.asarray(img.convert("L"), np.float32) / 255.0  # (h, w): strokes are thin, count them at full size
        assert 0.005 < (full < 0.45).mean() < 0.3
    for img in images["overexposed_lesion"]:  # blown-out skin: only a dark lesion's core keeps its colour
        assert _blown_out(img) > 0.7 > 0.1 > max(_blown_out(toy) for toy in toy_images)
    assert max(_contrast(img) for img in images["bare_skin"]) < toy_contrast[len(toy_contrast) // 2]
    skin = np.mean([np.asarray(img.resize((32, 32)), np.float32).mean((0, 1)) for img in images["bare_skin"]], 0)
    assert skin[0] > skin[1] > skin[2]  # still skin-toned: red > green > blue


def test_synth_kind_ood_cli(tmp_path, dermaid_cli, ood_dir):
    out = tmp_path / "toy-ood"
    proc = dermaid_cli("synth", "kind=ood", f"out={out}", "n=1", "seed=0", f"paths.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not lesions" in proc.stdout and "document=1" in proc.stdout
    rows = read_ood_set(str(out))
    assert [kind for _, kind in rows] == list(OOD_KINDS)
    for url, kind in rows:  # same seed, same drawing whatever n is: image 0 equals the fixture's
        assert Path(url).read_bytes() == (ood_dir / kind / f"{kind}_0.jpg").read_bytes()
    bad = dermaid_cli("synth", "kind=cats", f"out={tmp_path / 'x'}", f"paths.root={tmp_path}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "kind must be one of lesions, ood" in bad.stderr and "'cats'" in bad.stderr
    assert not (tmp_path / "x").exists()
