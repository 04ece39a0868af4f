"""Predictor: a checkpoint (any artifact kind) + its card -> calibrated probabilities for image bytes.

The one preprocessing path shared with `dermaid evaluate`:
    open_image(bytes) -> create_eval_transform(card.input) -> model(images, metadata)
    -> softmax(logits / card.temperature)  (dermaid.training.loop.probabilities_from_logits)

    predictor = Predictor("runs/toy/best")
    probs = predictor.predict([(jpeg_bytes, 55, "male", "posterior torso")])   # (1, 8) numpy
    batch = predictor.predict_full([(jpeg_bytes, 55, "male", "posterior torso")])
    batch.probabilities, batch.ood_scores, batch.abstain    # (1, 8); (1,) and (1,) bool, or None and None

ood_scores / abstain come from the card's OOD detector (dermaid.inference.ood_scorer; fitted by
`dermaid calibrate`); a checkpoint without one gives None / None (predictor.ood is None).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dermaid.classes import NUM_CLASSES
from dermaid.data.images import DEFAULT_MAX_PIXELS
from dermaid.data.transforms import create_eval_transform
from dermaid.inference.decoding import check_aspect_ratio, decode_image
from dermaid.inference.loaders import create_model_fn
from dermaid.inference.ood_scorer import OodScorer
from dermaid.models.card import CheckpointError, load_card, model_version
from dermaid.models.metadata import encode_metadata
from dermaid.training.loop import probabilities_from_logits


@dataclass(frozen=True)
class Prepared:
    """One decoded request image and what the model sees of it."""

    image: Image.Image            # upright RGB at the input size
    model_input: Image.Image      # the resized centre crop (what the model sees), RGB
    tensor: torch.Tensor          # (3, H, W) normalised
    crop_box: tuple[float, float, float, float]  # the crop in input-image pixels (left, top, right, bottom)


@dataclass(frozen=True)
class PredictionBatch:
    """predict_full's answer: probabilities, and the OOD decision when the checkpoint has a detector."""

    probabilities: np.ndarray          # (B, 8) calibrated, float64
    ood_scores: np.ndarray | None      # (B,) higher = less like the training images; None without a detector
    abstain: np.ndarray | None         # (B,) bool: refuse to answer; None without a detector


class Predictor:
    """A checkpoint ready for inference: bytes + metadata -> calibrated probabilities."""

    def __init__(self, checkpoint_url: str, device: str | torch.device = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.checkpoint_url = str(checkpoint_url)
        self.device = torch.device(device)
        self.max_pixels = int(max_pixels)
        self.card = load_card(self.checkpoint_url)
        self.kind = self.card.kind
        self.model = create_model_fn(self.checkpoint_url, self.card, self.device)
        self.version = model_version(self.card)
        self.temperature = self.card.temperature
        self.uses_metadata = self.card.uses_metadata
        self.input_spec = dict(self.card.input)
        self.transform = create_eval_transform(self.input_spec)
        self._geometry, self._normalise = _split_eval_transform(self.transform)
        feature_dim = getattr(self.model, "feature_dim", None) if self.card.is_float else None
        self.ood = OodScorer.load(self.checkpoint_url, self.card, feature_dim)  # None: no `ood` in the card

    @property
    def module(self) -> nn.Module:
        """The float torch module (saliency needs gradients through it)."""
        if not isinstance(self.model, nn.Module) or not self.card.is_float:
            raise CheckpointError(f"{self.checkpoint_url}: saliency needs float weights, not a {self.kind} artifact")
        return self.model

    def prepare(self, data: bytes) -> Prepared:
        """bytes -> decoded image, model-input crop and tensor. Raises ImageDecodeError (a DermaidError)."""
        image = decode_image(data, self.max_pixels)
        check_aspect_ratio(image)
        crop = self._geometry(image)
        tensor = self._normalise(crop)  # (3, H, W)
        return Prepared(image, crop, tensor, _crop_box(image.size, self.input_spec))

    def preprocess(self, data: bytes) -> torch.Tensor:
        """bytes -> normalised model input (3, H, W): open_image -> create_eval_transform(card.input)."""
        return self.prepare(data).tensor

    def encode_metadata(self, age: Any = None, sex: Any = None, site: Any = None) -> torch.Tensor:
        """(METADATA_DIM,) vector; missing fields are encoded as missing."""
        return encode_metadata(age, sex, site)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> np.ndarray:
        """images (B, 3, H, W), metadata (B, 14) | None -> calibrated probabilities (B, 8) float64.

        softmax(logits / T) through dermaid.training.loop.probabilities_from_logits, as `dermaid evaluate`.
        """
        images, metadata = self._inputs(images, metadata)
        logits = self.model(images, metadata).float().cpu()  # (B, 8)
        return probabilities_from_logits(logits, self.temperature)

    @torch.inference_mode()
    def forward_full(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> PredictionBatch:
        """forward, plus the OOD scores and abstain decisions when the card has a detector."""
        if self.ood is None:
            return PredictionBatch(self.forward(images, metadata), None, None)
        images, metadata = self._inputs(images, metadata)
        if self.ood.needs_features:
            features, logits = self.model.forward_with_features(images, metadata)  # (B, D), (B, 8)
            features = features.double().cpu().numpy()
        else:
            features, logits = None, self.model(images, metadata)  # (B, 8)
        logits = logits.float().cpu()
        scores = self.ood.score(features, logits.double().numpy())  # (B,)
        return PredictionBatch(probabilities_from_logits(logits, self.temperature), scores, self.ood.abstain(scores))

    def _inputs(self, images: torch.Tensor, metadata: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move to the device; metadata only for a model that reads it."""
        if metadata is not None and self.uses_metadata:
            return images.to(self.device), metadata.to(self.device)
        return images.to(self.device), None

    def warmup(self, batch_size: int = 1) -> None:
        """One forward on zeros, so the first request does not pay one-off start-up costs."""
        self.forward(torch.zeros(batch_size, *self.card.input_size),
                     torch.stack([self.encode_metadata()] * batch_size))  # (B, 3, H, W), (B, 14)

    def predict(self, items: Sequence[tuple[bytes, Any, Any, Any]]) -> np.ndarray:
        """[(image_bytes, age, sex, site), ...] -> (B, 8) calibrated probabilities (float64)."""
        if not items:
            return np.zeros((0, NUM_CLASSES), dtype=np.float64)
        return self.forward(*self._batch(items))

    def predict_full(self, items: Sequence[tuple[bytes, Any, Any, Any]]) -> PredictionBatch:
        """[(image_bytes, age, sex, site), ...] -> probabilities (B, 8), ood_scores (B,), abstain (B,) bool
        (both None when the card has no OOD detector: run `dermaid calibrate checkpoint=...` to add one)."""
        if not items:
            empty = np.zeros(0) if self.ood is not None else None
            return PredictionBatch(np.zeros((0, NUM_CLASSES), dtype=np.float64), empty,
                                   None if empty is None else empty.astype(bool))
        return self.forward_full(*self._batch(items))

    def _batch(self, items: Sequence[tuple[bytes, Any, Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.preprocess(data) for data, *_ in items])  # (B, 3, H, W)
        metadata = torch.stack([self.encode_metadata(*meta) for _, *meta in items])  # (B, 14)
        return images, metadata


def set_thread_torch_threads(threads: int) -> None:
    """torch.set_num_threads for the calling thread, made to stick. Torch sizes a thread's OpenMP team
    lazily, at its first parallel op, from the count any thread set last: a pool thread that set 1 could
    build a team of 2 there. Asking for the count first runs that lazy set-up now."""
    torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))


def _split_eval_transform(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    """create_eval_transform = geometry (PIL -> PIL crop) + normalisation (PIL -> tensor), split at ToTensor."""
    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if cut is None:
        raise RuntimeError("create_eval_transform has no ToTensor step; update dermaid.inference.predictor")
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def _crop_box(size: tuple[int, int], spec: dict[str, Any]) -> tuple[float, float, float, float]:
    """Where the eval transform's centre crop lies in the input image (torchvision's Resize + CenterCrop)."""
    width, height = size
    crop = int(spec["input_size"][-1])
    resize_to = int(math.floor(crop / float(spec["crop_pct"])))
    if width <= height:
        new_w, new_h = resize_to, int(resize_to * height / width)
    else:
        new_w, new_h = int(resize_to * width / height), resize_to
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
