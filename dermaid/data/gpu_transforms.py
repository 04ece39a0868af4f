"""The GPU input path: JPEG bytes decoded on the device and augmented there, a batch at a time.

    augment = create_train_transform(spec, cfg.augment)        # dermaid.data.transforms: the one definition
    loader = DeviceAugmentLoader(raw_loader, augment, device)  # raw_loader yields (list[bytes tensors], meta, labels)
    for images, metadata, labels in loader: ...                # images (B, 3, S, S) float on the device

The dataset workers only slice the JPEG bytes out of the shared buffer (dermaid.data.torch_dataset,
raw=True); the training process decodes the batch with torchvision.io.decode_jpeg(device="cuda") (nvJPEG),
draws one dermaid.data.transforms.ImagePlan per image (the CPU path's own draw) and executes it in torch:
the affine map (or a distortion's grid) as one grid_sample, blur/noise, CLAHE (kornia.enhance.equalize_clahe
on the LAB lightness, as OpenCV's CLAHE on the CPU path), HSV shifts, colour jitter, brightness/contrast,
cutout, normalisation. The same code runs on CPU tensors (tests compare it with the OpenCV executor);
only the decode needs CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from dermaid.data.transforms import ImagePlan, TrainAugment, finish, motion_kernel


def cuda_decode_available() -> bool:
    """True when torchvision can decode JPEGs on a CUDA device here."""
    return torch.cuda.is_available()


def decode_on_device(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors) -> RGB uint8 (3, h, w) tensors on `device` (nvJPEG on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return [decode_jpeg(data, mode=ImageReadMode.RGB) for data in encoded]


def _theta(plan: ImagePlan, height: int, width: int) -> torch.Tensor:
    """The plan's output -> source map in grid_sample's normalised coordinates (align_corners=False): (2, 3)."""
    size = plan.size

    def normalise(w: int, h: int) -> torch.Tensor:
        return torch.tensor([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]],
                            dtype=torch.float64)

    inverse = torch.as_tensor(plan.inverse, dtype=torch.float64)
    return (normalise(width, height) @ inverse @ torch.linalg.inv(normalise(size, size)))[:2]


def _sample(image: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
    """uint8 (3, h, w) -> float (3, S, S) on 0..255: the plan's geometry, one bilinear resample, zeros outside."""
    _, height, width = image.shape
    pixels = image.unsqueeze(0).float()  # (1, 3, h, w)
    if plan.grid is None:
        theta = _theta(plan, height, width).to(image.device, torch.float32).unsqueeze(0)  # (1, 2, 3)
        grid = F.affine_grid(theta, [1, 3, plan.size, plan.size], align_corners=False)  # (1, S, S, 2)
    else:
        points = torch.as_tensor(plan.grid, device=image.device)  # (S, S, 2) source pixel (x, y)
        scale = torch.tensor([width, height], device=image.device, dtype=torch.float32)
        grid = ((2 * points + 1) / scale - 1).unsqueeze(0)  # (1, S, S, 2)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _blur(pixels: torch.Tensor, kind: str, value: float, limit: int) -> torch.Tensor:
    """(3, S, S) float on 0..255 -> the same, blurred or with noise (rounded to whole levels, as uint8 would be)."""
    from torchvision.transforms.v2 import functional as TF

    if kind == "noise":
        return (pixels + torch.randn_like(pixels) * value).clamp(0, 255)
    if kind == "gaussian":
        k = int(value)
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a kernel size when none is given
        return TF.gaussian_blur(pixels, [k, k], [sigma, sigma])
    if kind == "median":
        from kornia.filters import median_blur

        return median_blur(pixels.unsqueeze(0), int(value))[0]
    kernel = torch.as_tensor(motion_kernel(limit, value), device=pixels.device)  # (k, k)
    weight = kernel.expand(3, 1, *kernel.shape)  # (3, 1, k, k): one filter per channel
    padded = F.pad(pixels.unsqueeze(0), [limit // 2] * 4, mode="reflect")
    return F.conv2d(padded, weight, groups=3)[0]


def _clahe(pixels: torch.Tensor, clip: float, grid: int) -> torch.Tensor:
    """CLAHE on the LAB lightness (OpenCV's CLAHE on the CPU path), kornia on tensors."""
    from kornia.color import lab_to_rgb, rgb_to_lab
    from kornia.enhance import equalize_clahe

    lab = rgb_to_lab(pixels.unsqueeze(0) / 255.0)  # (1, 3, S, S): L in 0..100
    light = equalize_clahe(lab[:, :1] / 100.0, clip_limit=float(clip), grid_size=(grid, grid)) * 100.0
    return (lab_to_rgb(torch.cat([light, lab[:, 1:]], dim=1)).clamp(0, 1) * 255.0)[0]


def _hsv(pixels: torch.Tensor, hue_degrees: float, saturation: float, value: float) -> torch.Tensor:
    """Hue turned by `hue_degrees`, saturation and value shifted on the 0..255 scale (albumentations' units)."""
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(pixels.unsqueeze(0) / 255.0)[0]  # (3, S, S): h in radians, s and v in 0..1
    h = torch.remainder(hsv[0] + math.radians(hue_degrees), 2 * math.pi)
    s = (hsv[1] + saturation / 255.0).clamp(0, 1)
    v = (hsv[2] + value / 255.0).clamp(0, 1)
    return hsv_to_rgb(torch.stack([h, s, v]).unsqueeze(0))[0] * 255.0


def _hue_turn(pixels: torch.Tensor, turn: float) -> torch.Tensor:
    return _hsv(pixels, turn * 360.0, 0.0, 0.0)


def apply_plans(images: list[torch.Tensor], plans: list[ImagePlan], augment: TrainAugment) -> torch.Tensor:
    """Decoded uint8 (3, h, w) images and their plans -> normalised (B, 3, S, S) float on the images' device."""
    settings = augment.augment
    out = []
    for image, plan in zip(images, plans):
        pixels = _sample(image, plan)  # (3, S, S) on 0..255
        if plan.blur is not None:
            pixels = _blur(pixels, *plan.blur, limit=int(settings["blur"]["limit"]))
        if plan.clahe is not None:
            pixels = _clahe(pixels, plan.clahe, int(settings["clahe"]["grid"]))
        if plan.hsv is not None:
            pixels = _hsv(pixels, plan.hsv[0] * 2.0, plan.hsv[1], plan.hsv[2])  # OpenCV's hue unit: 2 degrees
        if plan.jitter is not None and plan.jitter[3]:
            pixels = _hue_turn(pixels, plan.jitter[3])
        out.append(finish(pixels, plan, augment.mean_std(pixels.device)))
    return torch.stack(out)  # (B, 3, S, S)


def augment_encoded(encoded: list[torch.Tensor], augment: TrainAugment, device: torch.device) -> torch.Tensor:
    """JPEG bytes -> decoded on `device` -> one plan per image -> (B, 3, S, S) normalised on `device`."""
    images = decode_on_device(encoded, device)
    plans = [augment.plan(int(image.shape[1]), int(image.shape[2])) for image in images]
    return apply_plans(images, plans, augment)


class DeviceAugmentLoader:
    """Wraps a loader of raw batches (list of JPEG byte tensors, metadata (B, 14), labels (B,)) so it yields
    (images (B, 3, S, S) on `device`, metadata, labels) like the CPU path; `sampler` and len pass through."""

    def __init__(self, loader: Any, augment: TrainAugment, device: torch.device) -> None:
        self.loader, self.augment, self.device = loader, augment, device
        self.sampler = getattr(loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for (flat, lengths), metadata, labels in self.loader:
            encoded = list(torch.split(flat, lengths.tolist()))  # views of one buffer, one per image
            yield augment_encoded(encoded, self.augment, self.device), metadata, labels


def collate_encoded(batch: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """DataLoader collate for raw items: ((all JPEG bytes back to back (n,) uint8, lengths (B,)), metadata (B, 14),
    labels (B,)): one tensor crosses from a loader worker per batch, not one per image."""
    encoded, metadata, labels = zip(*batch)
    lengths = torch.as_tensor([len(data) for data in encoded], dtype=torch.long)  # (B,)
    return (torch.cat(encoded), lengths), torch.stack(metadata), torch.stack(labels)
