"""Running compressed artifacts: ONNX Runtime sessions and TorchScript modules as model callables.

Each loader returns what dermaid.inference.Predictor calls: (images (B, 3, H, W), metadata (B, 14) | None)
-> logits (B, 8) torch tensor. The ONNX graph's inputs are named `images` and (when the model uses
metadata) `metadata`; its output `logits`. A missing metadata batch is encoded as "all fields missing",
exactly as LesionClassifier.forward does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from dermaid.models.card import CheckpointError, ModelCard
from dermaid.models.metadata import missing_metadata
from dermaid.files import exists, join, read_bytes

IMAGES_INPUT = "images"
METADATA_INPUT = "metadata"
LOGITS_OUTPUT = "logits"


class OnnxModel:
    """An ONNX Runtime CPU session behind the model-callable interface."""

    def __init__(self, model_bytes: bytes, uses_metadata: bool, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # as many threads as torch uses in this process: float and int8 models get the same cores
        options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.uses_metadata = uses_metadata
        names = {i.name for i in self.session.get_inputs()}
        if IMAGES_INPUT not in names or (uses_metadata and METADATA_INPUT not in names):
            raise CheckpointError(f"ONNX graph inputs {sorted(names)} do not match the card "
                                  f"(expected {IMAGES_INPUT!r}" + (f" and {METADATA_INPUT!r})" if uses_metadata else ")"))

    def __call__(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        feeds = {IMAGES_INPUT: images.detach().cpu().float().contiguous().numpy()}  # (B, 3, H, W)
        if self.uses_metadata:
            if metadata is None:
                metadata = missing_metadata(images.shape[0])
            feeds[METADATA_INPUT] = metadata.detach().cpu().float().numpy()  # (B, 14)
        return torch.from_numpy(np.asarray(self.session.run([LOGITS_OUTPUT], feeds)[0]))  # (B, 8)


class TorchScriptModel:
    """A TorchScript module (traced with metadata when the model uses it) as a model callable."""

    def __init__(self, module: torch.jit.ScriptModule, uses_metadata: bool) -> None:
        self.module = module.eval()
        self.uses_metadata = uses_metadata

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        if not self.uses_metadata:
            return self.module(images)  # (B, 8)
        if metadata is None:
            metadata = missing_metadata(images.shape[0])
        return self.module(images, metadata.to(images.device))  # (B, 8)


def artifact_bytes(url: str, card: ModelCard) -> bytes:
    artifact = join(url, card.artifact)
    if not card.artifact or not exists(artifact):
        raise CheckpointError(f"{url}: artifact file {card.artifact!r} is missing")
    return read_bytes(artifact)


def load_onnx_model(url: str, card: ModelCard, threads: int | None = None) -> OnnxModel:
    """An ONNX (float or int8) checkpoint -> OnnxModel. CheckpointError when the file is damaged."""
    data = artifact_bytes(url, card)
    try:
        return OnnxModel(data, card.uses_metadata, threads)
    except CheckpointError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for a damaged graph
        raise CheckpointError(f"{url}: unreadable ONNX artifact ({type(exc).__name__}: {exc})") from None


def load_torchscript_model(url: str, card: ModelCard, device: torch.device) -> TorchScriptModel:
    data = artifact_bytes(url, card)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream (still supported in 2.14)
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and others for a damaged archive
        raise CheckpointError(f"{url}: unreadable TorchScript artifact ({type(exc).__name__}: {exc})") from None
    return TorchScriptModel(module, card.uses_metadata)
