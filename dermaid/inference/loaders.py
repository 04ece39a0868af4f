"""Artifact kind -> model function: the one dispatch point for float and compressed checkpoints.

    model_fn = create_model_fn("runs/toy/best", load_card("runs/toy/best"), torch.device("cpu"))
    logits = model_fn(images, metadata)    # (B, 3, H, W), (B, 14) | None -> (B, 8)

`LOADERS` maps the card's `kind` to a loader: "float" (torch weights), "quantized_static" /
"quantized_dynamic" / "onnx" (ONNX Runtime), "torchscript" (dermaid.compress.runtime) and "ensemble"
(dermaid.models.ensemble: members averaged);
`@register_loader(kind)` adds one.

    reason = tta_refusal(card, tta)    # None: this kind can average those test-time views; else why not
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dermaid.models.card import CheckpointError, ModelCard, load_float_model

# A model callable: images (B, 3, H, W), metadata (B, 14) | None -> logits (B, NUM_CLASSES).
ModelFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Loader = Callable[[str, ModelCard, torch.device], ModelFn]

# card.kind -> loader.
LOADERS: dict[str, Loader] = {}


def register_loader(kind: str) -> Callable[[Loader], Loader]:
    """Decorator: register the loader for one artifact kind (card.kind)."""
    def decorator(fn: Loader) -> Loader:
        LOADERS[kind] = fn
        return fn
    return decorator


# Kinds whose graph was traced or exported at the card's input size (dynamic batch only): a test-time view must keep
# (H, W), so the rotations and transposes of tta=8 fit them only when the input is square.
FIXED_INPUT_KINDS = frozenset({"quantized_static", "quantized_dynamic", "onnx", "torchscript"})
SHAPE_KEEPING_TTA = 4  # dermaid.training.loop.tta_views: the first 4 views are flips (identity, h, v, both)


def tta_refusal(card: ModelCard, tta: int) -> str | None:
    """Why a checkpoint of this kind cannot average `tta` test-time views (None: it can)."""
    _, height, width = card.input_size
    kinds = {card.kind, *(m.get("kind") for m in (card.ensemble or {}).get("members", []))}  # an ensemble: its members'
    if kinds & FIXED_INPUT_KINDS and tta > SHAPE_KEEPING_TTA and height != width:
        return (f"tta={tta} needs rotated views ({width}x{height} -> {height}x{width}), and a {card.kind} artifact "
                f"runs only at its exported {height}x{width} input; use tta={SHAPE_KEEPING_TTA} (flips) or its "
                f"float source")
    return None


def create_model_fn(url: str, card: ModelCard, device: torch.device) -> ModelFn:
    """The checkpoint at `url` as a model callable, through the loader of its card's kind."""
    loader = LOADERS.get(card.kind)
    if loader is None:
        raise CheckpointError(f"{url}: artifact kind {card.kind!r} has no loader; available: {sorted(LOADERS)}")
    return loader(url, card, device)


@register_loader("float")
def _load_float(url: str, card: ModelCard, device: torch.device) -> ModelFn:
    model, _ = load_float_model(url, device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# Compressed artifacts (dermaid.compress): int8 and float ONNX graphs run on ONNX Runtime (CPU),
# TorchScript on torch. Each returns the same model callable as the float loader.
@register_loader("quantized_static")
@register_loader("quantized_dynamic")
@register_loader("onnx")
def _load_onnx(url: str, card: ModelCard, device: torch.device) -> ModelFn:
    from dermaid.compress.runtime import load_onnx_model

    return load_onnx_model(url, card)


@register_loader("torchscript")
def _load_torchscript(url: str, card: ModelCard, device: torch.device) -> ModelFn:
    from dermaid.compress.runtime import load_torchscript_model

    return load_torchscript_model(url, card, device)


@register_loader("ensemble")
def _load_ensemble(url: str, card: ModelCard, device: torch.device) -> ModelFn:
    """Several checkpoints as one (dermaid.models.ensemble): each member through its own kind's loader."""
    from dermaid.models.ensemble import load_ensemble

    return load_ensemble(url, card, device)
