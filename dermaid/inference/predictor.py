"""Predictor: a checkpoint (any artifact kind) + its card -> calibrated probabilities for image bytes.

The one preprocessing path shared with `dermaid evaluate`:
    [process_image(bytes, card.preparation) ->] open_image -> create_eval_transform(card.input)
    -> model(images, metadata) -> softmax(logits / card.temperature)  (dermaid.training.loop.probabilities_from_logits)
A card with a `preparation` block (every card trained since it exists) first gets `dermaid prepare`'s own
process_image (dermaid.data.shards: JPEG draft, shorter side to image_size, JPEG re-encode), so an upload
reaches the model as the same pixels `dermaid evaluate` reads from its prepared row; older cards decode the
upload directly, as before.

    predictor = Predictor("runs/toy/best")
    probs = predictor.predict([(jpeg_bytes, 55, "male", "posterior torso")])   # (1, 8) numpy
    batch = predictor.predict_full([(jpeg_bytes, 55, "male", "posterior torso")])
    batch.probabilities, batch.ood_scores, batch.abstain    # (1, 8); (1,) and (1,) bool, or None and None

ood_scores / abstain come from the card's OOD detector (dermaid.inference.ood_scorer; fitted by
`dermaid calibrate`); a checkpoint without one gives None / None (predictor.ood is None).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import ResizeKeepRatio
from torch import nn
from torchvision import transforms as T

from dermaid.classes import NUM_CLASSES
from dermaid.data.images import DEFAULT_MAX_PIXELS
from dermaid.data.transforms import create_eval_transform
from dermaid.data.shards import PREPARATION_RULE
from dermaid.inference.decoding import (check_aspect_ratio, decode_bounded, decode_image, decode_prepared, decoded_size,
                                        fit_within)
from dermaid.inference.loaders import create_model_fn
from dermaid.inference.ood_scorer import OodScorer
from dermaid.models.card import CheckpointError, load_card, model_version
from dermaid.models.metadata import encode_metadata
from dermaid.training.loop import probabilities_from_logits


@dataclass
class Prepared:
    """One decoded request image and what the model sees of it.

    With a card's `preparation` the model sees prepare's pixels (a smaller JPEG), but what people see stays the
    upload: `image` (decoded on first use), `upload_size` and `crop_box` are in upload pixels; `display(max_side)`
    is the upload at a bounded size (what overlays are drawn on) with the crop in its pixels."""

    model_input: Image.Image      # the resized centre crop (what the model sees), RGB
    tensor: torch.Tensor          # (3, H, W) normalised
    crop_box: tuple[float, float, float, float]  # the crop in upload pixels (left, top, right, bottom)
    upload_size: tuple[int, int]  # (width, height) of the upright upload
    _decode_upload: Callable[[int | None], Image.Image]  # max_side (None: full size) -> the upload, upright RGB

    @cached_property
    def image(self) -> Image.Image:
        """The upload, upright RGB at its own size."""
        return self._decode_upload(None)

    def display(self, max_side: int | None) -> tuple[Image.Image, tuple[float, float, float, float]]:
        """The upload scaled down (never up) so its longer side is at most max_side (None: its own size; a JPEG
        decoded at a reduced scale for it), and crop_box in that image's pixels."""
        if max_side is None or max(self.upload_size) <= max_side:
            image = self.image
        else:
            image = self._decode_upload(max_side)
        sx, sy = image.width / self.upload_size[0], image.height / self.upload_size[1]
        left, top, right, bottom = self.crop_box
        return image, (left * sx, top * sy, right * sx, bottom * sy)


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
        self.preparation = _preparation(self.card.preparation, self.checkpoint_url)  # None: decode as uploaded
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
        if self.preparation is None:
            image = decode_image(data, self.max_pixels)
            check_aspect_ratio(image)
            crop = self._geometry(image)
            return Prepared(crop, self._normalise(crop), _crop_box(image, self._geometry), image.size,
                            lambda max_side: image if max_side is None else fit_within(image, max_side))
        upload_size = decoded_size(data, self.max_pixels)
        image = decode_prepared(data, self.preparation, self.max_pixels)  # what evaluate reads from the shard
        check_aspect_ratio(image)
        crop = self._geometry(image)
        left, top, right, bottom = _crop_box(image, self._geometry)
        sx, sy = upload_size[0] / image.width, upload_size[1] / image.height  # prepared -> upload pixels
        return Prepared(crop, self._normalise(crop), (left * sx, top * sy, right * sx, bottom * sy), upload_size,
                        lambda max_side: self._decode_upload(data, max_side))

    def _decode_upload(self, data: bytes, max_side: int | None) -> Image.Image:
        """The upload for people to see: at its own size (None), else bounded (decode_bounded: JPEG draft)."""
        if max_side is None:
            return decode_image(data, self.max_pixels)
        return decode_bounded(data, max_side, self.max_pixels)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """bytes -> normalised model input (3, H, W): [process_image ->] open_image -> create_eval_transform."""
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


def _preparation(block: dict[str, Any] | None, url: str) -> dict[str, Any] | None:
    """The card's `preparation` block, checked: it must name the rule this DermAID's process_image applies."""
    if block is None:
        return None
    differs = {key: block.get(key) for key, rule in PREPARATION_RULE.items() if block.get(key) != rule}
    if differs or not {"image_size", "quality"} <= set(block):
        raise CheckpointError(f"{url}: the card's preparation {block} is not the one this DermAID's prepare applies "
                              f"({PREPARATION_RULE} with image_size and quality); serving it would change its pixels")
    return dict(block)


def _crop_box(image: Image.Image, geometry: T.Compose) -> tuple[float, float, float, float]:
    """Where the eval transform's crop lies in the input image (left, top, right, bottom), for each of timm's crop
    modes: its last two steps are a resize (shorter side, both sides, or keep-ratio) and a centre crop (or pad)."""
    resize, crop = geometry.transforms[-2:]
    width, height = image.size
    if isinstance(resize, ResizeKeepRatio):
        new_h, new_w = resize.get_params(image, resize.size, resize.longest)
    elif isinstance(resize.size, int) or len(resize.size) == 1:  # shorter side, as torchvision's Resize
        short = int(resize.size if isinstance(resize.size, int) else resize.size[0])
        new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    else:
        new_h, new_w = (int(v) for v in resize.size)
    crop_h, crop_w = (crop.size, crop.size) if isinstance(crop.size, int) else crop.size
    left, top = int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
