"""The classifier: any timm backbone, an optional metadata branch, and the 8-class head.

    create_classifier(name="efficientnet_b0", pretrained=False, use_metadata=True)

forward(images (B, 3, H, W), metadata (B, METADATA_DIM) | None) -> logits (B, NUM_CLASSES)
forward_with_features(images, metadata) -> (features (B, D), logits (B, NUM_CLASSES)): D is what the head
    sees (pooled backbone features, joined with the metadata branch), before dropout; the OOD detectors'
    feature-space methods (dermaid.evaluation.ood) fit on them.
"""

from __future__ import annotations

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
    def feature_dim(self) -> int:
        """D: the width of the features forward_with_features returns (the head's input)."""
        return int(self.head.in_features)

    def forward_with_features(self, images: torch.Tensor,
                              metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D) the head sees, before dropout; logits (B, NUM_CLASSES))."""
        feats = self.backbone(images)  # (B, F)
        if self.metadata_branch is not None:
            if metadata is None:
                metadata = missing_metadata(images.shape[0]).to(images.device)
            meta_feats = self.metadata_branch(metadata.to(feats.dtype))  # (B, M)
            feats = torch.cat([feats, meta_feats], dim=1)  # (B, F + M)
        return feats, self.head(self.dropout(feats))  # (B, D), (B, NUM_CLASSES)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_features(images, metadata)[1]  # (B, NUM_CLASSES)


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
    """The input spec (size, mean, std, interpolation, crop_pct) from timm's data config.

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
    }
