"""The classifier: any timm backbone, an optional metadata branch, and the 8-class head.

    create_classifier(name="efficientnet_b0", pretrained=False, use_metadata=True)

forward(images (B, 3, H, W), metadata (B, METADATA_DIM) | None) -> logits (B, NUM_CLASSES)
forward_with_features(images, metadata) -> (features (B, D), logits (B, NUM_CLASSES)): the OOD detectors'
    features (dermaid.evaluation.ood), laid out as `feature_layout` says: first what the head sees (pooled
    backbone features joined with the metadata branch, before dropout; columns "head"), then per timm feature
    level (backbone.feature_info: stem to last stage) its activations' per-channel spatial mean and std
    (columns "level0", "level1", ...). Early levels carry the image statistics (colour, texture, sharpness)
    that tell a blank wall or a blurred thumb from a lesion photo; the head's features alone do not.
"""

from __future__ import annotations

import threading
from typing import Any

import timm
import torch
from torch import nn

from dermaid.classes import NUM_CLASSES
from dermaid.models.metadata import METADATA_DIM, missing_metadata


class LesionClassifier(nn.Module):
    """timm backbone (pooled features) + optional metadata MLP, joined before a linear head."""

    def __init__(
        self,
        name: str = "efficientnet_b0",
        pretrained: bool = False,
        use_metadata: bool = True,
        metadata_hidden: int = 32,
        drop_rate: float = 0.2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except RuntimeError as exc:  # timm: "Unknown model (...)"
            raise ValueError(f"unknown timm backbone {name!r}: {exc}") from None
        self.name = name
        self.use_metadata = use_metadata
        # pooled feature width: timm models with a pre-logits head (mobilenetv3, ...) expose head_hidden_size
        features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        if use_metadata:
            self.metadata_branch = nn.Sequential(
                nn.Linear(METADATA_DIM, metadata_hidden),
                nn.BatchNorm1d(metadata_hidden),
                nn.SiLU(),
                nn.Linear(metadata_hidden, metadata_hidden),
                nn.SiLU(),
            )
            features += metadata_hidden
        else:
            self.metadata_branch = None
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(features, num_classes)

    @property
    def feature_levels(self) -> list[tuple[str, int]]:
        """(module name, channels) of each timm feature level (empty for a backbone without feature_info)."""
        return [(str(info["module"]), int(info["num_chs"])) for info in getattr(self.backbone, "feature_info", [])]

    @property
    def feature_layout(self) -> dict[str, tuple[int, int]]:
        """Column ranges [start, stop) of forward_with_features' features: "head", then "level0", "level1", ..."""
        layout, start = {"head": (0, int(self.head.in_features))}, int(self.head.in_features)
        for index, (_, channels) in enumerate(self.feature_levels):
            layout[f"level{index}"] = (start, start + 2 * channels)  # per-channel mean | std
            start += 2 * channels
        return layout

    @property
    def feature_dim(self) -> int:
        """D: the width of the features forward_with_features returns (head input + feature-level statistics)."""
        return max(stop for _, stop in self.feature_layout.values())

    def _head_features(self, images: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        feats = self.backbone(images)  # (B, F)
        if self.metadata_branch is not None:
            if metadata is None:
                metadata = missing_metadata(images.shape[0]).to(images.device)
            meta_feats = self.metadata_branch(metadata.to(feats.dtype))  # (B, M)
            feats = torch.cat([feats, meta_feats], dim=1)  # (B, F + M)
        return feats  # (B, F [+ M])

    def forward_with_features(self, images: torch.Tensor,
                              metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D) as feature_layout says, logits (B, NUM_CLASSES) exactly as forward gives them)."""
        modules = [self.backbone.get_submodule(name) for name, _ in self.feature_levels]
        pooled: list[torch.Tensor | None] = [None] * len(modules)
        # a module's hooks fire for every thread's forward through it: a serving replica runs forwards on two
        # threads (serve/lanes.py) through one model, so each call keeps only its own thread's activations
        owner = threading.get_ident()

        def keep(index: int):
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                if threading.get_ident() != owner:
                    return
                flat = output.float().flatten(2)  # (B, C_l, H_l * W_l)
                mean = flat.mean(dim=2)  # (B, C_l)
                # population std from E[x^2] - E[x]^2: 5x faster than torch.std_mean on CPU, exact enough here
                std = ((flat * flat).mean(dim=2) - mean * mean).clamp_min(0.0).sqrt()  # (B, C_l)
                pooled[index] = torch.cat([mean, std], dim=1)  # (B, 2 C_l)
            return hook

        handles = [module.register_forward_hook(keep(index)) for index, module in enumerate(modules)]
        try:
            feats = self._head_features(images, metadata)  # (B, F [+ M])
        finally:
            for handle in handles:
                handle.remove()
        features = torch.cat([feats, *(level.to(feats.dtype) for level in pooled)], dim=1)  # (B, D)
        return features, self.head(self.dropout(feats))  # (B, D), (B, NUM_CLASSES)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self._head_features(images, metadata)))  # (B, NUM_CLASSES)


# the `model` keys that shape the network, with their types; the rest (metadata_dropout) is training-only
_ARCHITECTURE_KEYS = {"pretrained": bool, "use_metadata": bool, "metadata_hidden": int, "drop_rate": float}


def create_classifier(model_cfg: dict[str, Any]) -> LesionClassifier:
    """Build the classifier from the `model` config group or a card's `model` block (a plain dict).

    `name` is required; a key a card or test leaves out takes LesionClassifier's own default (the
    composed `model` group always sets every key).
    """
    given = {key: cast(model_cfg[key]) for key, cast in _ARCHITECTURE_KEYS.items() if key in model_cfg}
    return LesionClassifier(name=model_cfg["name"], **given)


def resolve_input_spec(model: LesionClassifier, img_size: int | None = None) -> dict[str, Any]:
    """The input spec (size, mean, std, interpolation, crop_pct, crop_mode) from timm's data config.

    img_size overrides timm's default resolution (the toy runs train at small sizes).
    """
    data_cfg = timm.data.resolve_model_data_config(model.backbone)
    size = tuple(data_cfg["input_size"])
    if img_size:
        size = (size[0], int(img_size), int(img_size))
    return {
        "input_size": list(size),
        "mean": [float(x) for x in data_cfg["mean"]],
        "std": [float(x) for x in data_cfg["std"]],
        "interpolation": str(data_cfg["interpolation"]),  # timm's resolved data config sets every key
        "crop_pct": float(data_cfg["crop_pct"]),
        "crop_mode": str(data_cfg["crop_mode"]),  # center | squash | border: dermaid.data.transforms
    }
