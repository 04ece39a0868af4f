"""Inference on single images: checkpoint + card -> preprocessing -> calibrated probabilities; Grad-CAM.

    predictor = Predictor("runs/toy/best")
    probs = predictor.predict([(jpeg_bytes, 55, "male", "posterior torso")])   # (1, 8) numpy
    result = build_result(probs[0])             # sorted classes, top class, malignancy score, triage
    explainer = Explainer(predictor)            # Grad-CAM family; one model copy per concurrent call
    saliency = explainer.explain(jpeg_bytes, method="gradcam")   # overlay PIL image: the upload, long side <= overlay_max_side

Modules, one idea each:
    loaders.py    artifact kind (card.kind) -> model function: float, onnx, torchscript, quantized
    decoding.py   untrusted bytes -> upright RGB image (decode_image, aspect-ratio guard)
    predictor.py  Predictor: the one preprocessing path shared with `dermaid evaluate`, calibrated probabilities
                  (predict_full: + OOD scores and abstain)
    ood_scorer.py the card's OOD detector (`dermaid calibrate`): scores, abstain, the UNK column
    triage.py     build_result: sorted classes, malignancy score, triage level and message
    saliency.py   Grad-CAM family: CamTarget, Explainer, overlay, saliency_png
    saliency_spec.py  the method names and overlay limit a request may ask for (torch-free)

Outputs are decision support for research, never a diagnosis (see dermaid.classes.DISCLAIMER).

Names load on first use (PEP 562 __getattr__): `from dermaid.inference import build_result` imports triage.py
only, so the serving front (launcher, Ingress) does not pay torch's and timm's import (seconds of a cold start).
"""

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {   # public name -> the module that defines it
    **dict.fromkeys(["MAX_ASPECT_RATIO", "ImageShapeError", "check_aspect_ratio", "decode_image"], "decoding"),
    **dict.fromkeys(["LOADERS", "Loader", "ModelFn", "create_model_fn", "register_loader"], "loaders"),
    "OodScorer": "ood_scorer",
    **dict.fromkeys(["PredictionBatch", "Predictor", "Prepared", "set_thread_torch_threads"], "predictor"),
    **dict.fromkeys(["CamTarget", "Explainer", "Saliency", "create_overlay", "find_cam_target", "saliency_png"],
                    "saliency"),
    **dict.fromkeys(["CAM_METHODS", "OVERLAY_MAX_SIDE"], "saliency_spec"),
    **dict.fromkeys(["DEFAULT_TRIAGE", "RETAKE_MESSAGE", "TRIAGE_MESSAGES", "build_result"], "triage"),
}
__all__ = [
    "CAM_METHODS", "DEFAULT_TRIAGE", "LOADERS", "MAX_ASPECT_RATIO", "OVERLAY_MAX_SIDE", "TRIAGE_MESSAGES", "CamTarget",
    "Explainer", "ImageShapeError", "Loader", "ModelFn", "OodScorer", "PredictionBatch", "Predictor", "Prepared",
    "RETAKE_MESSAGE", "Saliency", "build_result", "check_aspect_ratio", "create_model_fn", "create_overlay",
    "decode_image", "find_cam_target", "model_version", "register_loader", "saliency_png", "set_thread_torch_threads",
]


def __getattr__(name: str) -> Any:
    if name == "model_version":
        return importlib.import_module("dermaid.models.card").model_version
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


if TYPE_CHECKING:   # what type checkers and editors see: the same names, imported eagerly
    from dermaid.inference.decoding import MAX_ASPECT_RATIO, ImageShapeError, check_aspect_ratio, decode_image
    from dermaid.inference.loaders import LOADERS, Loader, ModelFn, create_model_fn, register_loader
    from dermaid.inference.ood_scorer import OodScorer
    from dermaid.inference.predictor import PredictionBatch, Predictor, Prepared, set_thread_torch_threads
    from dermaid.inference.saliency import CamTarget, Explainer, Saliency, create_overlay, find_cam_target, saliency_png
    from dermaid.inference.saliency_spec import CAM_METHODS, OVERLAY_MAX_SIDE
    from dermaid.inference.triage import DEFAULT_TRIAGE, RETAKE_MESSAGE, TRIAGE_MESSAGES, build_result
    from dermaid.models.card import model_version
