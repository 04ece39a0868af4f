"""Inference on single images: checkpoint + card -> preprocessing -> calibrated probabilities; Grad-CAM.

The one preprocessing path shared with `dermaid evaluate`:
    open_image(bytes) -> create_eval_transform(card["input"]) -> model(images, metadata)
    -> softmax(logits / card temperature)  (dermaid.training.loop.probabilities_from_logits)

    predictor = Predictor("runs/toy/best")
    probs = predictor.predict([(jpeg_bytes, 55, "male", "posterior torso")])   # (1, 8) numpy
    result = build_result(probs[0])             # sorted classes, top class, malignancy score, triage
    explainer = Explainer(predictor)            # Grad-CAM family; one model copy per concurrent call
    saliency = explainer.explain(jpeg_bytes, method="gradcam")   # overlay PIL image at the input size

Artifacts: `Predictor` loads card["kind"] through `LOADERS` (one loader per kind): "float" (torch
weights), "quantized_static" / "quantized_dynamic" / "onnx" (ONNX Runtime) and "torchscript"
(dermaid.compress.runtime); each returns a callable (images (B,3,H,W), metadata (B,14)|None) -> logits.
Saliency needs float weights (an nn.Module with gradients).

Outputs are decision support for research, never a diagnosis (see dermaid.classes.DISCLAIMER).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from dermaid.classes import BY_CODE, CLASS_CODES, CLASS_INDEX, DISCLAIMER, MALIGNANT_CODES, NUM_CLASSES
from dermaid.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, open_image
from dermaid.data.transforms import create_eval_transform
from dermaid.errors import DermaidError
from dermaid.models.card import CheckpointError, load_card, load_float_model
from dermaid.models.metadata import encode_metadata
from dermaid.training.loop import probabilities_from_logits


class ImageShapeError(ImageDecodeError):
    """A decodable image whose shape cannot be a lesion photo (extreme aspect ratio)."""


# A model callable: images (B, 3, H, W), metadata (B, 14) | None -> logits (B, NUM_CLASSES).
ModelFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Loader = Callable[[str, dict, torch.device], ModelFn]

# card["kind"] -> loader. The dispatch point for compressed artifacts (see module docstring).
LOADERS: dict[str, Loader] = {}

# Longest/shortest side above which an image cannot be a photo of a lesion; guards the resize step
# (a 1 x 50000 strip passes the pixel limit but would be resized to billions of pixels).
MAX_ASPECT_RATIO = 20.0

# Default triage thresholds on the malignancy score (overridable in conf/serve.yaml `triage`).
DEFAULT_TRIAGE = {"high": 0.5, "moderate": 0.2}
TRIAGE_MESSAGES = {
    "high": "The model gives this image a high malignancy score. Please have the spot examined by a "
            "dermatologist soon.",
    "moderate": "The model finds some features it associates with skin cancer. Consider having the spot "
                "checked by a dermatologist.",
    "low": "The model finds few features it associates with skin cancer. Keep an eye on the spot; if it is "
           "new, changing, bleeding or worries you, have it checked.",
}


def register_loader(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: register the loader for one artifact kind (card["kind"])."""
    def decorator(fn: Loader) -> Loader:
        LOADERS[kind] = fn
        return fn
    return decorator


@register_loader("float")
def _load_float(url: str, card: dict, device: torch.device) -> ModelFn:
    model, _ = load_float_model(url, device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# Compressed artifacts (dermaid.compress): int8 and float ONNX graphs run on ONNX Runtime (CPU),
# TorchScript on torch. Each returns the same model callable as the float loader.
@register_loader("quantized_static")
@register_loader("quantized_dynamic")
@register_loader("onnx")
def _load_onnx(url: str, card: dict, device: torch.device) -> ModelFn:
    from dermaid.compress.runtime import load_onnx_model

    return load_onnx_model(url, card)


@register_loader("torchscript")
def _load_torchscript(url: str, card: dict, device: torch.device) -> ModelFn:
    from dermaid.compress.runtime import load_torchscript_model

    return load_torchscript_model(url, card, device)


def model_version(card: dict[str, Any]) -> str:
    """A stable id for a checkpoint: backbone name + kind + a short hash of its model card."""
    digest = hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{card.get('model', {}).get('name', 'model')}-{card.get('kind', 'float')}-{digest}"


@dataclass(frozen=True)
class Prepared:
    """One decoded request image and what the model sees of it."""

    image: Image.Image            # upright RGB at the input size
    model_input: Image.Image      # the resized centre crop (what the model sees), RGB
    tensor: torch.Tensor          # (3, H, W) normalised
    crop_box: tuple[float, float, float, float]  # the crop in input-image pixels (left, top, right, bottom)


class Predictor:
    """A checkpoint ready for inference: bytes + metadata -> calibrated probabilities."""

    def __init__(self, checkpoint_url: str, device: str | torch.device = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.checkpoint_url = str(checkpoint_url)
        self.device = torch.device(device)
        self.max_pixels = int(max_pixels)
        self.card = load_card(self.checkpoint_url)
        self.kind = str(self.card.get("kind", "float"))
        loader = LOADERS.get(self.kind)
        if loader is None:
            raise CheckpointError(
                f"{self.checkpoint_url}: artifact kind {self.kind!r} has no loader; available: {sorted(LOADERS)}"
            )
        self.model = loader(self.checkpoint_url, self.card, self.device)
        self.version = model_version(self.card)
        self.temperature = float(self.card.get("calibration", {}).get("temperature", 1.0) or 1.0)
        self.uses_metadata = bool(self.card.get("metadata", {}).get("used", True))
        self.input_spec = dict(self.card["input"])
        self.transform = create_eval_transform(self.input_spec)
        self._geometry, self._normalise = _split_eval_transform(self.transform)

    @property
    def module(self) -> nn.Module:
        """The float torch module (saliency needs gradients through it)."""
        if not isinstance(self.model, nn.Module) or self.kind != "float":
            raise CheckpointError(f"{self.checkpoint_url}: saliency needs float weights, not a {self.kind} artifact")
        return self.model

    def prepare(self, data: bytes) -> Prepared:
        """bytes -> decoded image, model-input crop and tensor. Raises ImageDecodeError (a DermaidError)."""
        image = decode_image(data, self.max_pixels)
        width, height = image.size
        if max(width, height) / max(1, min(width, height)) > MAX_ASPECT_RATIO:
            raise ImageShapeError(
                f"image is {width}x{height}; the aspect ratio is above {MAX_ASPECT_RATIO:g}:1, not a lesion photo"
            )
        crop = self._geometry(image)
        tensor = self._normalise(crop)  # (3, H, W)
        return Prepared(image, crop, tensor, _crop_box(image.size, self.input_spec))

    def preprocess(self, data: bytes) -> torch.Tensor:
        """bytes -> normalised model input (3, H, W): open_image -> create_eval_transform(card["input"])."""
        return self.prepare(data).tensor

    def encode_metadata(self, age: Any = None, sex: Any = None, site: Any = None) -> torch.Tensor:
        """(METADATA_DIM,) vector; missing fields are encoded as missing."""
        return encode_metadata(age, sex, site)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> np.ndarray:
        """images (B, 3, H, W), metadata (B, 14) | None -> calibrated probabilities (B, 8) float64.

        softmax(logits / T) through dermaid.training.loop.probabilities_from_logits, as `dermaid evaluate`.
        """
        images = images.to(self.device)
        if metadata is not None and self.uses_metadata:
            metadata = metadata.to(self.device)
        else:
            metadata = None
        logits = self.model(images, metadata).float().cpu()  # (B, 8)
        return probabilities_from_logits(logits, self.temperature)

    def warmup(self, batch_size: int = 1) -> None:
        """One forward on zeros, so the first request does not pay one-off start-up costs."""
        self.forward(torch.zeros(batch_size, *[int(v) for v in self.input_spec["input_size"]]),
                     torch.stack([self.encode_metadata()] * batch_size))  # (B, 3, H, W), (B, 14)

    def predict(self, items: Sequence[tuple[bytes, Any, Any, Any]]) -> np.ndarray:
        """[(image_bytes, age, sex, site), ...] -> (B, 8) calibrated probabilities (float64)."""
        if not items:
            return np.zeros((0, NUM_CLASSES), dtype=np.float64)
        images = torch.stack([self.preprocess(data) for data, *_ in items])  # (B, 3, H, W)
        metadata = torch.stack([self.encode_metadata(*meta) for _, *meta in items])  # (B, 14)
        return self.forward(images, metadata)


def set_thread_torch_threads(threads: int) -> None:
    """torch.set_num_threads for the calling thread, made to stick. Torch sizes a thread's OpenMP team
    lazily, at its first parallel op, from the count any thread set last: a pool thread that set 1 could
    build a team of 2 there. Asking for the count first runs that lazy set-up now."""
    torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """open_image with every decoder failure reported as ImageDecodeError (untrusted bytes never crash)."""
    try:
        return open_image(data, max_pixels=max_pixels)
    except DermaidError:
        raise
    except MemoryError:
        raise ImageTooLargeError("image needs more memory to decode than this server allows") from None
    except Exception as exc:  # PIL raises struct.error, IndexError, ... for some damaged files
        raise ImageDecodeError(f"image could not be decoded: {type(exc).__name__}") from None


def _split_eval_transform(transform: T.Compose) -> tuple[T.Compose, T.Compose]:
    """create_eval_transform = geometry (PIL -> PIL crop) + normalisation (PIL -> tensor), split at ToTensor."""
    steps = list(transform.transforms)
    cut = next((i for i, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if cut is None:
        raise RuntimeError("create_eval_transform has no ToTensor step; update dermaid.inference")
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


def _crop_box(size: tuple[int, int], spec: dict[str, Any]) -> tuple[float, float, float, float]:
    """Where the eval transform's centre crop lies in the input image (torchvision's Resize + CenterCrop)."""
    width, height = size
    crop = int(spec["input_size"][-1])
    resize_to = int(math.floor(crop / float(spec.get("crop_pct", 1.0))))
    if width <= height:
        new_w, new_h = resize_to, int(resize_to * height / width)
    else:
        new_w, new_h = int(resize_to * width / height), resize_to
    left = int(round((new_w - crop) / 2.0))
    top = int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)


# --- results -------------------------------------------------------------------------------------------------

def build_result(probabilities: Sequence[float], malignant_codes: Sequence[str] = MALIGNANT_CODES,
                 triage: dict[str, float] | None = None) -> dict[str, Any]:
    """(8,) probabilities in CLASS_CODES order -> the JSON-ready result people read.

    The malignancy score is the summed probability of `malignant_codes`; triage levels come from
    thresholds on it ({"high": 0.5, "moderate": 0.2} by default).
    """
    probs = [float(p) for p in probabilities]
    if len(probs) != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} probabilities, got {len(probs)}")
    unknown = [code for code in malignant_codes if code not in CLASS_INDEX]
    if unknown:
        raise DermaidError(f"malignant_codes: unknown class codes {unknown}; allowed: {list(CLASS_CODES)}")
    thresholds = {**DEFAULT_TRIAGE, **(triage or {})}
    classes = sorted(
        ({"code": code, "name": BY_CODE[code].name, "probability": probs[i]} for i, code in enumerate(CLASS_CODES)),
        key=lambda row: row["probability"], reverse=True,
    )
    score = float(sum(probs[CLASS_INDEX[code]] for code in malignant_codes))
    level = "high" if score >= thresholds["high"] else "moderate" if score >= thresholds["moderate"] else "low"
    return {
        "probabilities": classes,
        "top": classes[0],
        "malignancy_score": score,
        "triage": {"level": level, "message": TRIAGE_MESSAGES[level]},
        "disclaimer": DISCLAIMER,
    }


# --- saliency (Grad-CAM family) ---------------------------------------------------------------------------

def _cam_classes() -> dict[str, type]:
    import pytorch_grad_cam as pgc

    # Methods that need one forward (and one backward to the target layer). ScoreCAM, AblationCAM and
    # FullGrad run many passes or full backprop per call: too slow to offer on a public route.
    return {
        "gradcam": pgc.GradCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "hirescam": pgc.HiResCAM,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
        "eigencam": pgc.EigenCAM,
        "eigengradcam": pgc.EigenGradCAM,
        "gradcamelementwise": pgc.GradCAMElementWise,
    }


CAM_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam",
                                "eigengradcam", "gradcamelementwise")


@dataclass(frozen=True)
class CamTarget:
    """The layer Grad-CAM reads, and how to turn its output into (B, C, h, w)."""

    name: str
    module: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None


def find_cam_target(model: nn.Module, input_size: Sequence[int]) -> CamTarget:
    """Pick the target layer from the backbone's architecture.

    ViT-style backbones (patch_embed + blocks): the last block's first norm, tokens reshaped to a grid.
    Everything else (CNNs, NHWC backbones such as Swin): the last module, in execution order, whose
    output is still a spatial map (B, C, h, w) with h, w > 1, i.e. the final feature map before pooling.
    """
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if hasattr(backbone, "patch_embed") and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        last = blocks[-1]
        module = getattr(last, "norm1", last)
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        index = len(blocks) - 1
        return CamTarget(f"backbone.blocks.{index}" + (".norm1" if module is not last else ""), module,
                         lambda tokens: _tokens_to_grid(tokens, prefix))
    nhwc = str(getattr(backbone, "output_fmt", "NCHW")) == "NHWC"
    names = {id(m): name for name, m in backbone.named_modules()}
    fired: list[nn.Module] = []

    def _hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            h, w = (output.shape[1], output.shape[2]) if nhwc else (output.shape[2], output.shape[3])
            if h > 1 and w > 1:
                fired.append(module)

    handles = [m.register_forward_hook(_hook) for m in backbone.modules() if m is not backbone]
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, *[int(s) for s in input_size]))
    finally:
        for handle in handles:
            handle.remove()
    if not fired:
        raise CheckpointError(f"no spatial feature map found in backbone {type(backbone).__name__} for Grad-CAM")
    module = fired[-1]
    return CamTarget(f"backbone.{names.get(id(module), '?')}", module, _nhwc_to_nchw if nhwc else None)


def _tokens_to_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, prefix + h*w, C) -> (B, C, h, w) for ViT-style backbones."""
    patches = tokens[:, prefix:, :]  # (B, h*w, C)
    side = int(round(math.sqrt(patches.shape[1])))
    if side * side != patches.shape[1]:
        raise ValueError(f"cannot reshape {patches.shape[1]} tokens into a square grid")
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)  # (B, C, h, w)


def _nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


class _WithMetadata(nn.Module):
    """Binds a metadata batch so Grad-CAM can call model(images)."""

    def __init__(self, model: nn.Module, metadata: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.metadata)  # (B, 8)


def _grad_from_here(_module: nn.Module, _inputs: Any, output: Any) -> Any:
    """Start the autograd graph at the CAM target: gradients reach it without backprop through the backbone."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return None


@dataclass(frozen=True)
class Saliency:
    target: str                  # class code explained
    probability: float           # its calibrated probability
    probabilities: list[float]   # all 8, CLASS_CODES order
    method: str
    overlay: Image.Image         # RGB at the input image's size
    layer: str


def saliency_png(saliency: Saliency, model_version: str, compress_level: int = 6) -> bytes:
    """The overlay as a PNG whose text chunks say what it shows and that it is decision support only
    (they stay with a saved file: image viewers and `PIL.Image.open(...).text` show them)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Description", f"DermAID {saliency.method} saliency (layer {saliency.layer}) for "
                  f"{saliency.target} ({BY_CODE[saliency.target].name}), probability {saliency.probability:.3f}, "
                  f"model {model_version}")
    info.add_text("Disclaimer", DISCLAIMER)
    buf = io.BytesIO()
    saliency.overlay.save(buf, "PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


class Explainer:
    """Grad-CAM family saliency for a float Predictor.

    A CAM object registers hooks and keeps activations and gradients of its call, and hooks on a shared
    module would see every concurrent forward. So each concurrent call takes its own model copy from a
    pool (`concurrency` copies) and builds a fresh CAM object on it; nothing per-call is shared.
    """

    def __init__(self, predictor: Predictor, concurrency: int = 1) -> None:
        self.predictor = predictor
        base = predictor.module
        self._pool: queue.Queue = queue.Queue()
        for i in range(max(1, int(concurrency))):
            model = base if i == 0 else copy.deepcopy(base)
            for param in model.parameters():
                param.requires_grad_(False)
            target = find_cam_target(model, predictor.input_spec["input_size"])
            if not getattr(target.module, "_dermaid_cam_hook", False):  # once per module, however many Explainers
                target.module.register_forward_hook(_grad_from_here)
                target.module._dermaid_cam_hook = True
            self._pool.put((model, target))
        self.target_name = target.name

    def warmup(self) -> None:
        """One call on a blank image: imports the CAM package and runs every first-call path once."""
        buf = io.BytesIO()
        Image.new("RGB", (96, 96), (128, 100, 90)).save(buf, "PNG")
        self.explain(buf.getvalue())

    def explain(self, data: bytes, age: Any = None, sex: Any = None, site: Any = None,
                target: str | None = None, method: str = "gradcam") -> Saliency:
        """bytes -> Saliency for `target` (default: the top class). Raises DermaidError for bad input."""
        if method not in CAM_METHODS:
            raise DermaidError(f"method: unknown saliency method {method!r}; allowed: {list(CAM_METHODS)}")
        if target is not None and target not in CLASS_INDEX:
            raise DermaidError(f"target: unknown class code {target!r}; allowed: {list(CLASS_CODES)}")
        prepared = self.predictor.prepare(data)
        metadata = self.predictor.encode_metadata(age, sex, site)[None] if self.predictor.uses_metadata else None
        images = prepared.tensor[None].to(self.predictor.device)  # (1, 3, H, W)
        model, cam_target = self._pool.get()
        try:
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            wrapped = _WithMetadata(model, metadata)
            with _cam_classes()[method](model=wrapped, target_layers=[cam_target.module],
                                        reshape_transform=cam_target.reshape) as cam:
                targets = None if target is None else [ClassifierOutputTarget(CLASS_INDEX[target])]
                heat = cam(input_tensor=images, targets=targets)[0]  # (H, W) in [0, 1]
                logits = cam.outputs.detach().float()  # (1, 8)
        finally:
            self._pool.put((model, cam_target))
        probs = probabilities_from_logits(logits, self.predictor.temperature)[0].tolist()
        index = CLASS_INDEX[target] if target is not None else int(np.argmax(probs))
        overlay = create_overlay(prepared.image, heat, prepared.crop_box)
        return Saliency(CLASS_CODES[index], float(probs[index]), probs, method, overlay, cam_target.name)


def create_overlay(image: Image.Image, heat: np.ndarray, crop_box: tuple[float, float, float, float],
                   image_weight: float = 0.55) -> Image.Image:
    """Blend a heat map (h, w in [0, 1], over the model's crop) onto the full image; outside the crop, dimmed.

    uint8 arithmetic throughout (about 3 bytes per pixel), so large inputs stay affordable.
    """
    import cv2

    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    out = (rgb // 2).astype(np.uint8)        # the model did not see outside the crop: dimmed
    height, width = rgb.shape[:2]
    left, top, right, bottom = crop_box
    x0, y0 = max(0, int(round(left))), max(0, int(round(top)))
    x1, y1 = min(width, max(x0 + 1, int(round(right)))), min(height, max(y0 + 1, int(round(bottom))))
    heat_u8 = np.uint8(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255)  # (h, w)
    heat_u8 = cv2.resize(heat_u8, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)  # (h', w', 3)
    region = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    out[y0:y1, x0:x1] = cv2.addWeighted(region, image_weight, colour, 1.0 - image_weight, 0.0)
    return Image.fromarray(out)
