"""The image transforms: one definition for training, evaluation, notebooks and Serve.

    transform = create_eval_transform(card.input)            # PIL RGB -> (3, H, W): evaluate, Predictor, Serve
    augment = create_train_transform(spec, cfg.augment)      # the `augment` group -> a TrainAugment
    tensor = augment(jpeg_bytes)                             # the CPU path: (3, S, S) normalised float
    plan = augment.plan(height, width)                       # one image's random draw; the GPU path
                                                             # (dermaid.data.gpu_transforms) executes the same plans

Both take the model card's input spec (size, mean, std, interpolation, crop_pct, crop_mode), which
comes from timm's data config (`dermaid.models.classifier.resolve_input_spec`). The eval geometry is
timm's own (`timm.data.transforms_factory.transforms_imagenet_eval`, every crop mode: center, squash,
border), so it cannot drift from what timm means by a data config.

Training augmentation: every random choice for one image is drawn once into an ImagePlan (the random
resized crop's box by torchvision's own RandomResizedCrop.get_params, rotation, flips and transpose,
shift-scale-rotate, colour jitter, brightness/contrast, one of blur/noise, one of the distortions, CLAHE,
HSV shifts, cutout); two executors run a plan: `TrainAugment` on the CPU (OpenCV on uint8 HWC arrays) and
dermaid.data.gpu_transforms on a batch on the GPU (torch, kornia). All geometry (crop, resize, rotation,
flips, transpose, shift-scale-rotate, and a distortion when drawn) is one affine map per image, applied in a
single resample, so each output pixel is interpolated once. OpenCV rather than torchvision's v2 tensor ops
on the CPU: measured on this project's VM, v2 on uint8 tensors was *slower* than the PIL path it replaces
(rotation through float grid_sample 2.7 ms and hue through an RGB->HSV in torch 8 ms per 384 px image,
against 0.8 ms and 0.3 ms in OpenCV); docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from timm.data.transforms_factory import transforms_imagenet_eval
from torchvision import transforms as T

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
BLUR_KINDS = ("motion", "median", "gaussian", "noise")  # the SIIM-ISIC 2020 winners' OneOf, equally likely
DISTORTION_KINDS = ("optical", "grid", "elastic")       # ... and their distortion OneOf


def _interp(spec: dict[str, Any]) -> T.InterpolationMode:
    """The spec's timm interpolation name; bicubic for a name torchvision lacks here (e.g. timm's "random")."""
    return _INTERPOLATION.get(spec["interpolation"], T.InterpolationMode.BICUBIC)


def crop_mode(spec: dict[str, Any]) -> str:
    """The spec's timm crop mode; cards written before it was recorded were evaluated centre-cropped."""
    return str(spec.get("crop_mode") or "center")  # not a config default: the geometry older cards were made with


def create_eval_transform(spec: dict[str, Any]) -> T.Compose:
    """PIL RGB -> normalised tensor (3, H, W): timm's eval transform for the spec (center: shorter side to
    size/crop_pct, centre crop; squash: both sides to size/crop_pct, centre crop; border: fit, pad, crop)."""
    _, height, width = (int(v) for v in spec["input_size"])
    return transforms_imagenet_eval(
        img_size=height if height == width else (height, width),
        crop_pct=float(spec["crop_pct"]),
        crop_mode=crop_mode(spec),
        interpolation=_interp_name(spec),
        mean=tuple(spec["mean"]),
        std=tuple(spec["std"]),
    )


def _interp_name(spec: dict[str, Any]) -> str:
    """The interpolation name timm's eval transform is given: _interp's choice, by name."""
    return {mode: name for name, mode in _INTERPOLATION.items()}[_interp(spec)]


def create_train_transform(spec: dict[str, Any], augment: dict[str, Any]) -> TrainAugment:
    """The `augment` config group (every key required) for the spec's input size -> a TrainAugment."""
    return TrainAugment(spec, augment)


# ---------------------------------------------------------------------------------------------
# One image's random draw


@dataclass
class ImagePlan:
    """Everything random about one augmented image; both executors (CPU, GPU) run the same plan."""

    size: int                                   # output side S
    forward: np.ndarray                         # (3, 3) decoded-image pixel -> output pixel (pixel centres)
    grid: np.ndarray | None = None              # (S, S, 2) float32 source (x, y) per output pixel: a distortion
    blur: tuple[str, float] | None = None       # (kind, parameter): kernel size, sigma, angle or noise std
    clahe: float | None = None                  # clip limit
    hsv: tuple[float, float, float] | None = None        # hue (OpenCV's 0..180 degrees/2), saturation, value shifts
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation factors; hue turn
    gain: tuple[float, float] | None = None     # brightness/contrast as albumentations: x * alpha + beta * 255
    cutout: list[tuple[int, int, int, int]] = field(default_factory=list)  # (top, left, height, width) boxes

    @property
    def inverse(self) -> np.ndarray:
        """(3, 3) output pixel -> decoded-image pixel."""
        return np.linalg.inv(self.forward)


class _Draws:
    """Uniform draws from torch's generator: DataLoader seeds it per worker, training seeds it per rank."""

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def chance(self, p: float) -> bool:
        return p > 0 and float(torch.rand(())) < p

    def choice(self, options: tuple[str, ...]) -> str:
        return options[int(torch.randint(len(options), ()))]


def _rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _scaling(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


class TrainAugment:
    """The `augment` group for one input size: plan(height, width) draws, __call__ runs a plan on the CPU.

    `draft`: the shorter side below which a JPEG is not decoded at a reduced scale (size / crop_pct, as the eval
    transform's resize), so a 512 px shard feeding a 224 px model decodes at 256 px: libjpeg's DCT scaling."""

    def __init__(self, spec: dict[str, Any], augment: dict[str, Any]) -> None:
        self.size = int(spec["input_size"][-1])
        self.mean = np.asarray(spec["mean"], dtype=np.float32) * 255.0  # (3,)
        self.std = np.asarray(spec["std"], dtype=np.float32) * 255.0    # (3,)
        self.draft = math.ceil(self.size / float(spec["crop_pct"]))
        self.augment = {key: augment[key] for key in augment}  # a plain dict (OmegaConf / pydantic dumps alike)
        self._draw = _Draws()
        # One OpenCV thread in this process (and so in the DataLoader workers it forks): a loader works on one image
        # at a time per worker, and an OpenCV thread pool started before a fork deadlocks the forked workers
        # (tests/test_loader.py hung that way).
        cv2.setNumThreads(1)

    # -- the draw --------------------------------------------------------------------------------

    def plan(self, height: int, width: int) -> ImagePlan:
        """One image's random augmentation, for a decoded image of height x width pixels."""
        a, d, size = self.augment, self._draw, self.size
        top, left, box_h, box_w = T.RandomResizedCrop.get_params(
            torch.zeros(()).expand(1, height, width), list(a["scale"]), list(a["ratio"]))
        centre = (size - 1) / 2.0
        # source pixels -> output coordinates centred on 0 (pixel centres: the crop's resize, align_corners=False)
        forward = _scaling(size / box_w, size / box_h) @ _translation(-(left + box_w / 2 - 0.5), -(top + box_h / 2 - 0.5))
        if float(a["rotation"]):
            forward = _rotation(d.uniform(-float(a["rotation"]), float(a["rotation"]))) @ forward
        flips = np.eye(3)
        if a["hflip"] and d.chance(0.5):
            flips = _scaling(-1, 1) @ flips
        if a["vflip"] and d.chance(0.5):
            flips = _scaling(1, -1) @ flips
        if a["transpose"] and d.chance(0.5):
            flips = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ flips
        forward = flips @ forward
        ssr = a["shift_scale_rotate"]
        if d.chance(float(ssr["p"])):
            shift, scale, turn = float(ssr["shift"]), float(ssr["scale"]), float(ssr["rotate"])
            zoom = d.uniform(1 - scale, 1 + scale)
            forward = (_translation(d.uniform(-shift, shift) * size, d.uniform(-shift, shift) * size)
                       @ _scaling(zoom, zoom) @ _rotation(d.uniform(-turn, turn)) @ forward)
        plan = ImagePlan(size=size, forward=_translation(centre, centre) @ forward)
        self._draw_pixels(plan)
        return plan

    def _draw_pixels(self, plan: ImagePlan) -> None:
        """The non-geometric draws (and a distortion's sampling grid) into `plan`."""
        a, d, size = self.augment, self._draw, self.size
        distortion = a["distortion"]
        if d.chance(float(distortion["p"])):
            plan.grid = _distortion_grid(d, d.choice(DISTORTION_KINDS), size, distortion, plan.inverse)
        blur = a["blur"]
        if d.chance(float(blur["p"])):
            kind = d.choice(BLUR_KINDS)
            limit = int(blur["limit"])
            if kind == "noise":
                plan.blur = (kind, math.sqrt(d.uniform(*(float(v) for v in blur["noise_var"]))))
            elif kind == "motion":
                plan.blur = (kind, d.uniform(0.0, 180.0))  # the streak's angle; its length is `limit`
            else:  # median / gaussian: an odd kernel in 3..limit
                plan.blur = (kind, float(2 * int(torch.randint(1, max(1, (limit - 1) // 2) + 1, ())) + 1))
        clahe = a["clahe"]
        if d.chance(float(clahe["p"])):
            plan.clahe = d.uniform(1.0, float(clahe["clip_limit"]))
        hsv = a["hsv"]
        if d.chance(float(hsv["p"])):
            plan.hsv = tuple(d.uniform(-float(hsv[k]), float(hsv[k])) for k in ("hue", "saturation", "value"))
        jitter = float(a["color_jitter"])
        if jitter:
            hue = min(jitter / 4, 0.05)
            plan.jitter = (d.uniform(max(0.0, 1 - jitter), 1 + jitter), d.uniform(max(0.0, 1 - jitter), 1 + jitter),
                           d.uniform(max(0.0, 1 - jitter), 1 + jitter), d.uniform(-hue, hue))
        bc = a["brightness_contrast"]
        alpha = 1 + d.uniform(-float(bc["contrast"]), float(bc["contrast"])) if d.chance(float(bc["p"])) else 1.0
        beta = d.uniform(-float(bc["brightness"]), float(bc["brightness"])) if d.chance(float(bc["p"])) else 0.0
        if alpha != 1.0 or beta != 0.0:
            plan.gain = (alpha, beta)
        cutout = a["cutout"]
        if d.chance(float(cutout["p"])):
            side = max(1, int(float(cutout["size"]) * size))
            for _ in range(int(cutout["holes"])):
                cy, cx = int(torch.randint(size, ())), int(torch.randint(size, ()))
                top, left = max(0, cy - side // 2), max(0, cx - side // 2)
                plan.cutout.append((top, left, min(size, cy + side // 2) - top, min(size, cx + side // 2) - left))

    # -- the CPU executor --------------------------------------------------------------------------

    def decode(self, data: bytes | np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
        """JPEG (or any OpenCV format) bytes -> RGB uint8 (h, w, 3), at half or quarter scale when the shorter side
        stays >= draft (height/width: the stored size, when known, saves nothing but a header read)."""
        buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
        flags = cv2.IMREAD_COLOR
        if height and width:
            short = min(height, width)
            if short >= 4 * self.draft:
                flags = cv2.IMREAD_REDUCED_COLOR_4
            elif short >= 2 * self.draft:
                flags = cv2.IMREAD_REDUCED_COLOR_2
        image = cv2.imdecode(buffer, flags)
        if image is None:
            from dermaid.data.images import ImageDecodeError

            raise ImageDecodeError("image could not be decoded")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __call__(self, data: bytes | np.ndarray, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Encoded image bytes (or an RGB uint8 (h, w, 3) array) -> augmented, normalised (3, S, S) float32."""
        image = self.decode(data, height, width) if not (isinstance(data, np.ndarray) and data.ndim == 3) else data
        return self.apply(image, self.plan(*image.shape[:2]))

    def apply(self, image: np.ndarray, plan: ImagePlan) -> torch.Tensor:
        """Run `plan` on an RGB uint8 (h, w, 3) image -> (3, S, S) float32, normalised."""
        size = plan.size
        if plan.grid is None:
            out = cv2.warpAffine(image, plan.forward[:2], (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)  # (S, S, 3) uint8
        else:
            out = cv2.remap(image, plan.grid[..., 0], plan.grid[..., 1], cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if plan.blur is not None:
            out = _blur(out, *plan.blur, limit=int(self.augment["blur"]["limit"]))
        if plan.clahe is not None:
            grid = int(self.augment["clahe"]["grid"])
            lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
            lab[..., 0] = cv2.createCLAHE(plan.clahe, (grid, grid)).apply(lab[..., 0])
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        if plan.hsv is not None:
            out = _hsv_shift(out, *plan.hsv)
        if plan.jitter is not None and plan.jitter[3]:
            out = _hue_turn(out, plan.jitter[3])
        if plan.jitter is not None:
            out = _jitter_uint8(out, *plan.jitter[:3])
        if plan.gain is not None:
            out = cv2.addWeighted(out, plan.gain[0], out, 0.0, plan.gain[1] * 255.0)  # saturating, as clamp
        if plan.cutout:
            out = out.copy() if not out.flags.writeable else out
            for top, left, h, w in plan.cutout:
                out[top:top + h, left:left + w] = 0
        planes = [plane.astype(np.float32) for plane in cv2.split(out)]  # 3 x (S, S): one pass each, contiguous
        for plane, mean, std in zip(planes, self.mean, self.std):
            plane -= mean
            plane /= std
        return torch.from_numpy(np.stack(planes))  # (3, S, S)

    def mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The spec's normalisation on the 0..255 scale: mean (3, 1, 1), std (3, 1, 1)."""
        return (torch.as_tensor(self.mean, device=device).view(3, 1, 1),
                torch.as_tensor(self.std, device=device).view(3, 1, 1))


# ---------------------------------------------------------------------------------------------
# Float stages shared by both executors (torch on (3, S, S) floats on 0..255)


def gray(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma."""
    r, g, b = GRAY_WEIGHTS
    return pixels[..., 0:1, :, :] * r + pixels[..., 1:2, :, :] * g + pixels[..., 2:3, :, :] * b


def jitter(pixels: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """torchvision's ColorJitter factors: brightness scales, contrast blends with the mean luma, saturation with
    the pixel's luma; clipped after each step as torchvision does."""
    pixels = (pixels * brightness).clamp_(0, 255)
    mean = gray(pixels).mean()
    pixels = ((pixels - mean) * contrast + mean).clamp_(0, 255)
    luma = gray(pixels)
    return ((pixels - luma) * saturation + luma).clamp_(0, 255)


def finish(pixels: torch.Tensor, plan: ImagePlan, mean_std: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(3, S, S) on 0..255 after geometry, blur, CLAHE and hue -> jitter, brightness/contrast, cutout, normalised."""
    if plan.jitter is not None:
        pixels = jitter(pixels, *plan.jitter[:3])
    if plan.gain is not None:
        alpha, beta = plan.gain
        pixels = (pixels * alpha + beta * 255.0).clamp_(0, 255)
    for top, left, h, w in plan.cutout:
        pixels[:, top:top + h, left:left + w] = 0.0
    mean, std = mean_std
    return (pixels - mean) / std  # (3, S, S)


# ---------------------------------------------------------------------------------------------
# CPU kernels (uint8 / float32 HWC)


def _jitter_uint8(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """jitter() on uint8 RGB with OpenCV's saturating arithmetic (values rounded after each step, as torchvision
    rounds on uint8 tensors)."""
    image = cv2.addWeighted(image, brightness, image, 0.0, 0.0)
    mean = float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean())
    image = cv2.addWeighted(image, contrast, image, 0.0, (1.0 - contrast) * mean)
    luma = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, saturation, luma, 1.0 - saturation, 0.0)


def _hue_turn(image: np.ndarray, turn: float) -> np.ndarray:
    """Rotate hue by `turn` of a full circle (torchvision's hue factor) on uint8 RGB, through OpenCV's 0..255 HSV."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    lut = np.stack([(np.arange(256) + round(turn * 256)) % 256, np.arange(256), np.arange(256)], axis=-1)
    return cv2.cvtColor(cv2.LUT(hsv, lut.astype(np.uint8)[:, None, :]), cv2.COLOR_HSV2RGB_FULL)


def _hsv_shift(image: np.ndarray, hue: float, saturation: float, value: float) -> np.ndarray:
    """albumentations' HueSaturationValue on uint8 RGB: hue in OpenCV's 0..180, saturation and value on 0..255."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    values = np.arange(256)
    lut = np.stack([(values + round(hue)) % 180, np.clip(values + saturation, 0, 255),
                    np.clip(values + value, 0, 255)], axis=-1).astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(hsv, lut[:, None, :]), cv2.COLOR_HSV2RGB)


def motion_kernel(length: int, angle: float) -> np.ndarray:
    """(length, length) float32 line through the centre at `angle` degrees, summing to 1: a motion blur."""
    kernel = np.zeros((length, length), dtype=np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(math.radians(angle)) * c, math.sin(math.radians(angle)) * c
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
    return kernel / kernel.sum()


def _blur(image: np.ndarray, kind: str, value: float, limit: int) -> np.ndarray:
    if kind == "median":
        return cv2.medianBlur(image, int(value))
    if kind == "gaussian":
        return cv2.GaussianBlur(image, (int(value), int(value)), 0)
    if kind == "motion":
        return cv2.filter2D(image, -1, motion_kernel(limit, value))
    noise = torch.randn(image.shape).numpy() * value  # (S, S, 3): drawn at run time, the plan holds its std
    return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _distortion_grid(d: _Draws, kind: str, size: int, settings: dict[str, Any], inverse: np.ndarray) -> np.ndarray:
    """(S, S, 2) float32: for each output pixel, the decoded-image (x, y) it samples, a distortion composed with the
    plan's affine map (one resample). optical: barrel/pincushion k in +-optical on the unit disc; grid: a
    steps x steps grid whose cells are stretched by 1 + U(+-grid); elastic: a smoothed random displacement."""
    u = np.arange(size, dtype=np.float32)
    xs, ys = np.meshgrid(u, u)  # (S, S) output pixel centres
    c = (size - 1) / 2.0
    if kind == "optical":
        k = d.uniform(-float(settings["optical"]), float(settings["optical"]))
        nx, ny = (xs - c) / c, (ys - c) / c
        factor = 1 + k * (nx * nx + ny * ny) / 2  # /2: the corners (r^2 = 2) move by k, the edge midpoints by k/2
        xs, ys = nx * factor * c + c, ny * factor * c + c
    elif kind == "grid":
        steps = int(settings["grid_steps"])
        limit = float(settings["grid"])

        def axis() -> np.ndarray:
            cells = np.array([1 + d.uniform(-limit, limit) for _ in range(steps)])
            edges = np.concatenate([[0.0], np.cumsum(cells / cells.sum())]) * (size - 1)
            return np.interp(u, np.linspace(0, size - 1, steps + 1), edges).astype(np.float32)

        xs, ys = np.meshgrid(axis(), axis())
    else:
        alpha, sigma = float(settings["elastic_alpha"]), float(settings["elastic_sigma"])
        field = (torch.rand(2, size, size).numpy() * 2 - 1).astype(np.float32)
        dx = cv2.GaussianBlur(field[0], (0, 0), sigma) * alpha
        dy = cv2.GaussianBlur(field[1], (0, 0), sigma) * alpha
        xs, ys = xs + dx, ys + dy
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T  # (S, S, 3)
    return np.ascontiguousarray(points[..., :2], dtype=np.float32)
