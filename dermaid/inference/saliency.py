"""Grad-CAM family saliency for a float Predictor: which pixels drove a class score, as an overlay.

    explainer = Explainer(predictor)            # one model copy per concurrent call
    saliency = explainer.explain(jpeg_bytes, method="gradcam")   # overlay: the upload, long side <= OVERLAY_MAX_SIDE
    saliency = explainer.explain(jpeg_bytes, full_size=True)      # overlay at the upload's own size
    png = saliency_png(saliency, predictor.version)              # with "decision support only" text chunks

Saliency needs float weights (an nn.Module with gradients): for a compressed artifact, load its float
source (dermaid.models.card.float_weights_for). The target layer follows the architecture (find_cam_target).
An ensemble (dermaid.models.ensemble) is explained by every member's float weights, all for the class the
ensemble chose, and the members' maps (each in [0, 1]) are averaged.
"""

from __future__ import annotations

import copy
import io
import math
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dermaid.classes import BY_CODE, CLASS_CODES, CLASS_INDEX, DISCLAIMER
from dermaid.errors import DermaidError
from dermaid.inference.predictor import Predictor
from dermaid.inference.saliency_spec import CAM_METHODS, OVERLAY_MAX_SIDE
from dermaid.models.card import CheckpointError
from dermaid.training.loop import probabilities_from_logits


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
    """One explained image: the class, its probability, the overlay and where the CAM read from."""

    target: str                  # class code explained
    probability: float           # its calibrated probability
    probabilities: list[float]   # all 8, CLASS_CODES order
    method: str
    overlay: Image.Image         # RGB: the upright upload, long side <= overlay_max_side unless full_size
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
    Overlays are the upload scaled to at most `overlay_max_side` on its long side (full_size=True: its own size).
    """

    def __init__(self, predictor: Predictor, concurrency: int = 1, overlay_max_side: int = OVERLAY_MAX_SIDE) -> None:
        self.predictor = predictor
        self.overlay_max_side = int(overlay_max_side)
        bases = _cam_models(predictor)  # [(float module, its card's metadata use)]: one, or an ensemble's members
        self._pool: queue.Queue = queue.Queue()
        for i in range(max(1, int(concurrency))):
            entry = []
            for base, uses_metadata in bases:
                model = base if i == 0 else copy.deepcopy(base)
                for param in model.parameters():
                    param.requires_grad_(False)
                target = find_cam_target(model, predictor.input_spec["input_size"])
                if not getattr(target.module, "_dermaid_cam_hook", False):  # once per module, however many Explainers
                    target.module.register_forward_hook(_grad_from_here)
                    target.module._dermaid_cam_hook = True
                entry.append((model, target, uses_metadata))
            self._pool.put(entry)
        self.target_name = ", ".join(dict.fromkeys(target.name for _, target, _ in entry))

    def warmup(self) -> None:
        """One call on a blank image: imports the CAM package and runs every first-call path once."""
        buf = io.BytesIO()
        Image.new("RGB", (96, 96), (128, 100, 90)).save(buf, "PNG")
        self.explain(buf.getvalue())

    def explain(self, data: bytes, age: Any = None, sex: Any = None, site: Any = None,
                target: str | None = None, method: str = "gradcam", full_size: bool = False) -> Saliency:
        """bytes -> Saliency for `target` (default: the top class), the overlay at most overlay_max_side on its long
        side (full_size: at the upload's size). Raises DermaidError for bad input."""
        if method not in CAM_METHODS:
            raise DermaidError(f"method: unknown saliency method {method!r}; allowed: {list(CAM_METHODS)}")
        if target is not None and target not in CLASS_INDEX:
            raise DermaidError(f"target: unknown class code {target!r}; allowed: {list(CLASS_CODES)}")
        prepared = self.predictor.prepare(data)
        metadata = self.predictor.encode_metadata(age, sex, site)[None] if self.predictor.uses_metadata else None
        images = prepared.tensor[None].to(self.predictor.device)  # (1, 3, H, W)
        entry = self._pool.get()
        try:
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            ensemble_probs = None
            if len(entry) > 1:  # an ensemble: its own probabilities choose the class every member explains
                ensemble_probs = self.predictor.forward(images, metadata)[0].tolist()
                if target is None:
                    target = CLASS_CODES[int(np.argmax(ensemble_probs))]
            heats = []
            for model, cam_target, uses_metadata in entry:
                wrapped = _WithMetadata(model, metadata if uses_metadata else None)
                with _cam_classes()[method](model=wrapped, target_layers=[cam_target.module],
                                            reshape_transform=cam_target.reshape) as cam:
                    targets = None if target is None else [ClassifierOutputTarget(CLASS_INDEX[target])]
                    heats.append(cam(input_tensor=images, targets=targets)[0])  # (H, W) in [0, 1]
                    logits = cam.outputs.detach().float()  # (1, 8)
        finally:
            self._pool.put(entry)
        heat = np.mean(heats, axis=0)  # (H, W): the members' maps averaged (one map for a single model)
        probs = ensemble_probs or probabilities_from_logits(logits, self.predictor.temperature)[0].tolist()
        index = CLASS_INDEX[target] if target is not None else int(np.argmax(probs))
        shown, crop_box = prepared.display(None if full_size else self.overlay_max_side)  # the crop in its pixels
        overlay = create_overlay(shown, heat, crop_box)
        return Saliency(CLASS_CODES[index], float(probs[index]), probs, method, overlay, self.target_name)


def _cam_models(predictor: Predictor) -> list[tuple[nn.Module, bool]]:
    """The float modules Grad-CAM runs, each with whether it reads metadata: the predictor's own, or for an
    ensemble every member's float weights (a compressed member's float source)."""
    if predictor.kind == "ensemble":
        from dermaid.models.ensemble import float_members

        return [(model, card.uses_metadata) for model, card in
                float_members(predictor.checkpoint_url, predictor.card, predictor.device)]
    return [(predictor.module, True)]


def create_overlay(image: Image.Image, heat: np.ndarray, crop_box: tuple[float, float, float, float],
                   image_weight: float = 0.55) -> Image.Image:
    """Blend a heat map (h, w in [0, 1], over the model's crop) onto the full image; outside the crop, dimmed.

    uint8 arithmetic, in place where OpenCV allows (about 3 bytes per pixel per array, four arrays at the peak), so
    a full-size overlay of a large upload stays affordable.
    """
    import cv2

    rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8, a writable copy
    height, width = rgb.shape[:2]
    left, top, right, bottom = crop_box
    x0, y0 = max(0, int(round(left))), max(0, int(round(top)))
    x1, y1 = min(width, max(x0 + 1, int(round(right)))), min(height, max(y0 + 1, int(round(bottom))))
    heat_u8 = np.uint8(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255)  # (h, w)
    heat_u8 = cv2.resize(heat_u8, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)  # (h', w', 3) BGR
    cv2.cvtColor(colour, cv2.COLOR_BGR2RGB, dst=colour)
    region = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    cv2.addWeighted(region, image_weight, colour, 1.0 - image_weight, 0.0, dst=colour)
    rgb //= 2                                # the model did not see outside the crop: dimmed
    rgb[y0:y1, x0:x1] = colour
    return Image.fromarray(rgb)
