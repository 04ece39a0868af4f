"""Export a float checkpoint to ONNX or TorchScript for other runtimes, checked against PyTorch.

    dermaid export checkpoint=runs/tune/toy/best format=onnx           # -> runs/tune/toy/best-onnx/
    dermaid export checkpoint=runs/tune/toy/best format=torchscript out=runs/toy-ts

The output is a checkpoint directory (card.json + model.onnx | model.ts.pt) that dermaid.inference.Predictor
and `dermaid serve` load by its card's kind ("onnx" | "torchscript"). Before anything is written the
artifact runs on sample inputs next to the PyTorch model and the maximum absolute logit difference is
printed; above `tolerance` the export is refused.

ONNX uses torch.export (the default exporter since PyTorch 2.9) with a dynamic batch dimension; the
input size is the card's. TorchScript (torch.jit.trace) still works in PyTorch 2.14 but is deprecated
upstream; prefer ONNX for new deployments.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.models.card import CARD_FILE, ModelCard, load_card, save_checkpoint
from dermaid.models.metadata import encode_metadata, missing_metadata
from dermaid.compress.runtime import IMAGES_INPUT, LOGITS_OUTPUT, METADATA_INPUT
from dermaid.files import absolute_url

FORMATS = {"onnx": ("onnx", "model.onnx"), "torchscript": ("torchscript", "model.ts.pt")}


def load_float_source(url: str, what: str = "checkpoint"):
    """(float model, card) of a checkpoint; a clear error for a compressed artifact (nothing to re-compress)."""
    from dermaid.models.card import load_float_model

    card = load_card(url)
    kind = card.kind
    if not card.is_float:
        source = card.compression_source
        raise DermaidError(f"{what}={url} is a {kind} artifact already; compress its float checkpoint"
                           + (f" ({source})" if source else "") + " instead")
    return load_float_model(url, "cpu")


def artifact_card(source_card: ModelCard, source_url: str, kind: str, artifact: str,
                  compression: dict[str, Any]) -> ModelCard:
    """The source's model card for a derived artifact: new kind/artifact, plus how it was made."""
    return source_card.derived(kind, artifact, {"source": source_url, **compression})


def sample_inputs(card: ModelCard, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic check inputs at the card's size: (images (B, 3, H, W), metadata (B, 14)).

    Images are standard-normal in the normalised space (what preprocessing produces); metadata mixes
    all-missing rows with encoded ones.
    """
    generator = torch.Generator().manual_seed(seed)
    _, height, width = card.input_size
    images = torch.randn(batch, 3, height, width, generator=generator)  # (B, 3, H, W)
    metadata = missing_metadata(batch)  # (B, 14)
    examples = [(35, "female", "lower extremity"), (70, "male", "head/neck"), (55, None, "anterior torso")]
    for i in range(1, batch, 2):
        metadata[i] = encode_metadata(*examples[(i // 2) % len(examples)])
    return images, metadata


def export_onnx(model: torch.nn.Module, card: ModelCard, opset: int = 18) -> bytes:
    """The model as an ONNX graph (inputs images[, metadata], output logits; dynamic batch)."""
    uses_metadata = card.uses_metadata
    images, metadata = sample_inputs(card, batch=2)
    batch = torch.export.Dim("batch", min=1, max=1024)
    args: tuple = (images, metadata) if uses_metadata else (images,)
    names = [IMAGES_INPUT, METADATA_INPUT] if uses_metadata else [IMAGES_INPUT]
    shapes = {IMAGES_INPUT: {0: batch}, **({METADATA_INPUT: {0: batch}} if uses_metadata else {})}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "model.onnx")
        wrapped = _Positional(model, uses_metadata).eval()
        torch.onnx.export(wrapped, args, path, input_names=names, output_names=[LOGITS_OUTPUT],
                          dynamic_shapes=shapes, dynamo=True, opset_version=int(opset), external_data=False,
                          verbose=False)
        with open(path, "rb") as f:
            return f.read()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The torch.export-based exporter prints progress lines and logs every pass at INFO: keep the CLI readable."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_torchscript(model: torch.nn.Module, card: ModelCard) -> bytes:
    """The model traced with torch.jit.trace (with metadata when it uses it), saved to bytes."""
    uses_metadata = card.uses_metadata
    images, metadata = sample_inputs(card, batch=2)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; see the module docstring
        wrapped = _Positional(model, uses_metadata).eval()
        traced = torch.jit.trace(wrapped, (images, metadata) if uses_metadata else (images,))
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _jit_load(data: bytes, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices
        return torch.jit.load(io.BytesIO(data), map_location=device)


class _Positional(torch.nn.Module):
    """LesionClassifier with positional inputs only (metadata left out when the model ignores it)."""

    def __init__(self, model: torch.nn.Module, uses_metadata: bool) -> None:
        super().__init__()
        self.model = model
        self.uses_metadata = uses_metadata

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(images, metadata if self.uses_metadata else None)  # (B, 8)


def max_abs_difference(reference: torch.nn.Module, candidate, card: ModelCard, batch: int = 4) -> float:
    """Max |logit difference| between the float model and an artifact callable on sample inputs."""
    images, metadata = sample_inputs(card, batch=batch, seed=1)
    with torch.no_grad():
        expected = reference(images, metadata).float()  # (B, 8)
        got = torch.as_tensor(candidate(images, metadata)).float()  # (B, 8)
    return float((expected - got).abs().max())


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid export checkpoint=CKPT format=onnx|torchscript [out=DIR]`."""
    from dermaid.compress.runtime import OnnxModel, TorchScriptModel

    for key in ("checkpoint",):
        if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, key):
            raise DermaidError(f"{key}= is required: a float checkpoint directory (e.g. runs/tune/toy/best)")
    plain = to_plain(cfg)
    fmt = str(plain["format"])
    if fmt not in FORMATS:
        raise DermaidError(f"format={fmt!r}: expected one of {sorted(FORMATS)}")
    source = absolute_url(str(plain["checkpoint"]))  # the card names it: saliency finds the float weights there
    model, card = load_float_source(source)
    uses_metadata = card.uses_metadata
    kind, artifact = FORMATS[fmt]
    if fmt == "onnx":
        data = export_onnx(model, card, int(plain["opset"]))
        runner = OnnxModel(data, uses_metadata)
    else:
        data = export_torchscript(model, card)
        runner = TorchScriptModel(_jit_load(data), uses_metadata)
    diff = max_abs_difference(model, runner, card, int(plain["check_batch"]))
    tolerance = float(plain["tolerance"])
    print(f"{fmt} vs PyTorch on {int(plain['check_batch'])} sample inputs: max abs logit difference {diff:.3g}")
    if not np.isfinite(diff) or diff > tolerance:
        raise DermaidError(f"export check failed: max abs logit difference {diff:.3g} above tolerance={tolerance:g}; "
                           "nothing written")
    out = str(plain["out"])
    out_card = artifact_card(card, source, kind, artifact, {"format": fmt, "max_abs_diff": diff,
                                                            "opset": int(plain["opset"]) if fmt == "onnx" else None})
    save_checkpoint(out, out_card, artifact_bytes=data)
    written = load_card(out).artifact  # `artifact`, or a fresh name when an object-store checkpoint was replaced
    print(f"{kind} artifact ({len(data) / 1e6:.1f} MB) -> {out}/{written} (+ {CARD_FILE})")
    print(DISCLAIMER)
    return {"out": out, "kind": kind, "max_abs_diff": diff, "bytes": len(data)}
