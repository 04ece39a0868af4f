"""The image transforms: one definition for training, evaluation, notebooks and Serve.

Both take the model card's input spec (size, mean, std, interpolation, crop_pct), which comes
from timm's data config (`dermaid.models.classifier.resolve_input_spec`).
"""

from __future__ import annotations

import math
from typing import Any

from torchvision import transforms as T

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def _interp(spec: dict[str, Any]) -> T.InterpolationMode:
    """The spec's timm interpolation name; bicubic for a name torchvision lacks here (e.g. timm's "random")."""
    return _INTERPOLATION.get(spec["interpolation"], T.InterpolationMode.BICUBIC)


def create_eval_transform(spec: dict[str, Any]) -> T.Compose:
    """PIL RGB -> normalised tensor (3, H, W): resize the shorter side to size/crop_pct, centre crop."""
    size = int(spec["input_size"][-1])
    resize_to = int(math.floor(size / float(spec["crop_pct"])))
    return T.Compose([
        T.Resize(resize_to, interpolation=_interp(spec)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])


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
