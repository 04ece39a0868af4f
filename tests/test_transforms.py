"""The training transforms (dermaid.data.transforms, dermaid.data.gpu_transforms): the CPU path keeps the configured
geometry, both executors run the same plan, every siim_isic augmentation acts, and the GPU path skips cleanly
without CUDA. Fast tier: no Ray, no files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dermaid.data import gpu_transforms
from dermaid.data.transforms import TrainAugment, create_train_transform
from dermaid.training.worker_config import AugmentSettings

AUGMENT_DIR = Path(__file__).resolve().parents[1] / "conf" / "augment"
SPEC = {"input_size": [3, 96, 96], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "crop_pct": 0.875, "interpolation": "bicubic"}


def _augment(name: str, **changes) -> dict:
    settings = yaml.safe_load((AUGMENT_DIR / f"{name}.yaml").read_text())
    settings.update(changes)
    return settings


def _gradient(height: int = 150, width: int = 200) -> np.ndarray:
    """RGB uint8 (h, w, 3): red encodes x, green encodes y, blue constant: where a pixel came from is readable."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.full_like(xs, 128.0)],
                    axis=-1).round().astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _pixels(augment: TrainAugment, tensor: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, S, S) -> (S, S, 3) on 0..255."""
    return (tensor.permute(1, 2, 0).numpy() * augment.std + augment.mean)


@pytest.mark.parametrize("name", sorted(p.stem for p in AUGMENT_DIR.glob("*.yaml")))
def test_every_augment_group_parses_and_runs(name):
    settings = yaml.safe_load((AUGMENT_DIR / f"{name}.yaml").read_text())
    AugmentSettings.model_validate(settings)  # every key present, none unknown
    out = create_train_transform(SPEC, settings)(_jpeg(_gradient()))
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_plans_keep_the_configured_crop_area_aspect_and_rotation():
    """The affine map of each plan: crop area within `scale`, aspect within `ratio`, angle within `rotation`."""
    torch.manual_seed(0)
    augment = create_train_transform(SPEC, _augment("default", rotation=30, hflip=False, vflip=False))
    height, width, size = 150, 200, 96
    areas, angles = [], []
    for _ in range(200):
        linear = augment.plan(height, width).inverse[:2, :2]  # output pixel -> source pixel: D @ Q
        sides = np.linalg.norm(linear, axis=1)  # (crop width, crop height) / S
        areas.append(sides[0] * sides[1] * size * size / (height * width))
        assert 0.8 - 0.01 <= sides[0] / sides[1] <= 1.25 + 0.01  # pixel rounding of the box
        rotation = linear / sides[:, None]  # orthogonal: a rotation, no flip (both flips off)
        assert np.linalg.det(rotation) > 0
        angles.append(math.degrees(math.atan2(rotation[1, 0], rotation[0, 0])))
    assert 0.5 - 1e-6 <= min(areas) and max(areas) <= 1.0 + 1e-6 and max(areas) - min(areas) > 0.3
    assert max(abs(a) for a in angles) <= 30 + 1e-6 and max(angles) > 20 and min(angles) < -20


def test_flips_follow_the_config():
    torch.manual_seed(0)
    none = create_train_transform(SPEC, _augment("none"))
    assert all(np.linalg.det(none.plan(150, 200).forward[:2, :2]) > 0 for _ in range(50))
    flips = create_train_transform(SPEC, _augment("none", hflip=True))
    signs = {bool(np.linalg.det(flips.plan(150, 200).forward[:2, :2]) > 0) for _ in range(50)}
    assert signs == {True, False}


def test_cpu_path_samples_where_the_plan_says():
    """The OpenCV executor on a JPEG: each output pixel holds the source pixel the plan maps it to."""
    torch.manual_seed(1)
    augment = create_train_transform(SPEC, _augment("default", color_jitter=0.0))
    image = _gradient()
    decoded = augment.decode(_jpeg(image))
    for _ in range(5):
        plan = augment.plan(*decoded.shape[:2])
        out = _pixels(augment, augment.apply(decoded, plan))  # (S, S, 3)
        u, v = np.meshgrid(np.arange(20, 76), np.arange(20, 76))  # interior output pixels
        src = np.stack([u, v, np.ones_like(u)], axis=-1) @ plan.inverse.T  # (.., 3) source (x, y, 1)
        inside = (src[..., 0] > 1) & (src[..., 0] < 198) & (src[..., 1] > 1) & (src[..., 1] < 148)
        x_read = out[..., 0][20:76, 20:76] * 199 / 255
        y_read = out[..., 1][20:76, 20:76] * 149 / 255
        assert np.median(np.abs(x_read - src[..., 0])[inside]) < 1.5
        assert np.median(np.abs(y_read - src[..., 1])[inside]) < 1.5


def test_none_is_a_plain_resize_of_the_whole_image():
    augment = create_train_transform(SPEC, _augment("none"))
    image = _gradient(96 * 2, 96 * 2)
    out = _pixels(augment, augment(image))
    expected = image[::2, ::2].astype(np.float32) + np.array([127.5 / 191, 127.5 / 191, 0])  # 2x down, centres
    assert np.abs(out - expected).mean() < 1.5


def test_reduced_decode_keeps_the_geometry():
    """A JPEG twice the draft size decodes at half scale; the plan is drawn on what was decoded."""
    augment = create_train_transform(SPEC, _augment("none"))
    data = _jpeg(_gradient(400, 560))
    assert augment.decode(data, 400, 560).shape == (200, 280, 3)  # draft = ceil(96 / 0.875) = 110: 400 >= 2 x 110
    assert augment.decode(data).shape == (400, 560, 3)
    half, full = _pixels(augment, augment(data, 400, 560)), _pixels(augment, augment(data))
    assert np.abs(half - full).mean() < 2.0


@pytest.mark.parametrize(("name", "tolerance"), [("default", 0.03), ("siim_isic", 0.1)])
def test_both_executors_run_the_same_plan(name, tolerance):
    """The GPU path's torch code (here on CPU tensors) and the OpenCV path give the same image for a plan."""
    torch.manual_seed(2)
    augment = create_train_transform(SPEC, _augment(name))
    from dermaid.data.synth import lesion_image

    image = np.array(lesion_image("MEL", 3, 4, (200, 150)))
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # (3, h, w) uint8, as decode_jpeg gives
    for _ in range(8):
        plan = augment.plan(*image.shape[:2])
        if plan.blur is not None and plan.blur[0] == "noise":
            plan.blur = None  # noise is drawn at run time
        cpu = augment.apply(image, plan)
        torch_path = gpu_transforms.apply_plans([tensor], [plan], augment)[0]
        # normalised units (0.03 ~ 2 grey levels): OpenCV rounds to uint8 between steps, torch stays float; CLAHE
        # (OpenCV's against kornia's) and the median's borders differ a little more
        assert (cpu - torch_path).abs().mean() < tolerance, plan


@pytest.mark.parametrize("key", ["brightness_contrast", "blur", "distortion", "clahe", "hsv", "shift_scale_rotate",
                                 "cutout"])
def test_each_siim_isic_augmentation_changes_the_image(key):
    """With only `key` on (p=1), the output differs from the same draw with everything off."""
    off = _augment("none")
    on = {**off, key: {**yaml.safe_load((AUGMENT_DIR / "siim_isic.yaml").read_text())[key], "p": 1.0}}
    if key == "distortion":  # the winners' elastic (alpha 3, sigma 50) moves pixels by ~0.03 px: make it visible
        on[key]["elastic_alpha"] = 400.0
    from dermaid.data.synth import lesion_image

    image = np.array(lesion_image("BCC", 5, 6, (200, 150)))
    torch.manual_seed(3)
    plain = create_train_transform(SPEC, off)(image)
    torch.manual_seed(3)
    changed = create_train_transform(SPEC, on)(image)
    assert (plain - changed).abs().mean() > 0.01


def test_torch_executor_batches_decoded_images():
    augment = create_train_transform(SPEC, _augment("default"))
    encoded = [torch.frombuffer(bytearray(_jpeg(_gradient(h, w))), dtype=torch.uint8) for h, w in ((150, 200), (120, 90))]
    batch = gpu_transforms.augment_encoded(encoded, augment, torch.device("cpu"))
    assert batch.shape == (2, 3, 96, 96) and torch.isfinite(batch).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: nvJPEG decode and augment on the device")
def test_gpu_path_decodes_and_augments_on_the_device():
    augment = create_train_transform(SPEC, _augment("siim_isic"))
    encoded = [torch.frombuffer(bytearray(_jpeg(_gradient())), dtype=torch.uint8) for _ in range(4)]
    device = torch.device("cuda")
    batch = gpu_transforms.augment_encoded(encoded, augment, device)
    assert batch.device.type == "cuda" and batch.shape == (4, 3, 96, 96) and torch.isfinite(batch).all()
    image = gpu_transforms.decode_on_device(encoded[:1], device)[0]
    plan = create_train_transform(SPEC, _augment("none")).plan(*image.shape[1:])
    on_gpu = gpu_transforms.apply_plans([image], [plan], augment)[0].cpu()
    on_cpu = augment.apply(image.permute(1, 2, 0).cpu().numpy().copy(), plan)
    assert (on_gpu - on_cpu).abs().mean() < 0.06
