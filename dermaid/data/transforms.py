"""The image transforms: one definition for training, evaluation, notebooks and Serve.

Both take the model card's input spec (size, mean, std, interpolation, crop_pct, crop_mode), which
comes from timm's data config (`dermaid.models.classifier.resolve_input_spec`). The eval geometry is
timm's own (`timm.data.transforms_factory.transforms_imagenet_eval`, every crop mode: center, squash,
border), so it cannot drift from what timm means by a data config.
"""

from __future__ import annotations

from typing import Any

from timm.data.transforms_factory import transforms_imagenet_eval
from torchvision import transforms as T

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


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


def create_train_transform(spec: dict[str, Any], augment: dict[str, Any]) -> T.Compose:
    """PIL RGB -> augmented normalised tensor (3, H, W), from the `augment` config group (every key required)."""
    size = int(spec["input_size"][-1])
    steps: list = [
        T.RandomResizedCrop(size, scale=tuple(augment["scale"]), ratio=tuple(augment["ratio"]),
                            interpolation=_interp(spec)),
    ]
    if augment["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if augment["vflip"]:
        steps.append(T.RandomVerticalFlip())
    degrees = float(augment["rotation"])
    if degrees:
        steps.append(T.RandomRotation(degrees, interpolation=T.InterpolationMode.BILINEAR))
    jitter = float(augment["color_jitter"])
    if jitter:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(jitter / 4, 0.05)))
    steps += [T.ToTensor(), T.Normalize(spec["mean"], spec["std"])]
    return T.Compose(steps)
