"""Post-training int8 quantization for CPU serving, with ONNX Runtime.

    dermaid quantize checkpoint=runs/tune/toy/best method=static        # -> runs/tune/toy/best-int8-static/
    dermaid quantize checkpoint=runs/tune/toy/best method=dynamic
    dermaid quantize checkpoint=CKPT method=static calibration_images=512 data.version=toy

static:  the float model is exported to ONNX (dermaid.compress.export), then
         onnxruntime.quantization.quantize_static writes an int8 graph: per-channel int8 weights and
         uint8 activations whose ranges are calibrated on `calibration_images` training images of
         the checkpoint's dataset version (the same preprocessing as evaluation). Convolutions run as
         int8 kernels: the speed-up for CNN backbones on CPU.
dynamic: onnxruntime.quantization.quantize_dynamic: int8 weights, activation ranges computed per
         batch at run time. Only MatMul/Gemm/Conv weights change; for convolutional backbones
         it is usually no faster than float (the per-batch activation quantization costs as much
         as it saves), it pays off for Linear-heavy models (ViT heads, large MLPs).
Why ONNX Runtime and not torch.ao: PyTorch 2.14 marks torch.ao.quantization (eager and FX) as
deprecated in favour of torchao's PT2E flow, and on this machine's AVX2 CPU the ONNX Runtime int8
graph is both faster than torch.ao's int8 model and than PyTorch float (measured by
benchmarks/compression_table.py). Depthwise-separable backbones (MobileNetV3, EfficientNet) gain
little or lose from int8 here; plain-convolution ResNets gain most.

The artifact (model.int8.onnx + card.json, kind quantized_static | quantized_dynamic) loads with
dermaid.inference.Predictor. Unless evaluate=false, the int8 model and the float one are compared on
the validation fold (balanced accuracy and top-1 agreement), printed and written into the card.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.models.card import CARD_FILE, ModelCard, save_checkpoint
from dermaid.files import absolute_url

METHODS = {"static": "quantized_static", "dynamic": "quantized_dynamic"}
INT8_ARTIFACT = "model.int8.onnx"
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATE_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def quantize_onnx(onnx_bytes: bytes, method: str, calibration: list[dict[str, np.ndarray]] | None = None,
                  quant_format: str = "qdq", per_channel: bool = True, calibrate_method: str = "minmax",
                  float_stem: bool = True) -> bytes:
    """A float ONNX graph -> an int8 ONNX graph (static: calibrated on `calibration` feeds).

    float_stem keeps the first convolution (the one that sees the normalised pixels) in float: on the toy
    resnet10t, int8 there alone flips 12% of top-1 predictions (max logit error 6.4); kept float, none (0.17)."""
    import onnx

    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("float.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(onnx_bytes)
        quant_pre_process(src, pre)  # shape inference + graph optimisation: what quantization expects
        keep_float = [n.name for n in onnx.load(pre).graph.node if n.op_type == "Conv"][:1] if float_stem else []
        if method == "static":
            if not calibration:
                raise DermaidError("method=static needs calibration images (calibration_images > 0)")
            quantize_static(pre, dst, _Reader(calibration),
                            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATE_METHODS[calibrate_method]),
                            nodes_to_exclude=keep_float)
        else:
            quantize_dynamic(pre, dst, per_channel=per_channel, weight_type=QuantType.QUInt8, nodes_to_exclude=keep_float)
        with open(dst, "rb") as f:
            return f.read()


def calibration_feeds(records, card: ModelCard, batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Records -> ONNX feeds ({images (B, 3, H, W), metadata (B, 14)}) through the evaluation preprocessing."""
    from dermaid.compress.runtime import IMAGES_INPUT, METADATA_INPUT
    from dermaid.data.torch_dataset import create_eval_loader

    uses_metadata = card.uses_metadata
    feeds = []
    for images, metadata, _ in create_eval_loader(records, card.input, batch_size=batch_size):
        feed = {IMAGES_INPUT: images.numpy()}  # (B, 3, H, W)
        if uses_metadata:
            feed[METADATA_INPUT] = metadata.numpy()  # (B, 14)
        feeds.append(feed)
    return feeds


def resolve_data_version(plain: dict[str, Any], card: ModelCard) -> str:
    """The prepared version to calibrate/evaluate on: data.version, else the card's own version in
    data.prepared_dir, else data.root prepared on demand."""
    from dermaid.data.loading import resolve_version
    from dermaid.data.prepare import ensure_prepared
    from dermaid.files import exists, join

    data = dict(plain["data"])
    if not data["version"] and card.dataset_version:
        candidate = join(str(data["prepared_dir"]), str(card.dataset_version))
        if exists(join(candidate, "manifest.json")):
            return resolve_version(str(data["prepared_dir"]), str(card.dataset_version))
    return ensure_prepared(data)


def compare_on_records(float_model: torch.nn.Module, candidate, records, card: ModelCard,
                       batch_size: int = 32) -> dict[str, float]:
    """Balanced accuracy of both models and their top-1 agreement on labelled records."""
    from dermaid.data.torch_dataset import create_eval_loader
    from dermaid.evaluation.metrics import compute_metrics

    float_logits, cand_logits, labels = [], [], []
    with torch.no_grad():
        for images, metadata, y in create_eval_loader(records, card.input, batch_size=batch_size):
            float_logits.append(float_model(images, metadata).float())  # (B, 8)
            cand_logits.append(torch.as_tensor(candidate(images, metadata)).float())  # (B, 8)
            labels.append(y)
    a, b, y = torch.cat(float_logits), torch.cat(cand_logits), torch.cat(labels).numpy()
    out = {"agreement_top1": float((a.argmax(1) == b.argmax(1)).float().mean()), "num_images": int(len(y))}
    labelled = y >= 0
    if labelled.any():
        out["float/balanced_accuracy"] = float(compute_metrics(y[labelled], torch.softmax(a, 1).numpy()[labelled])
                                               ["balanced_accuracy"])
        out["balanced_accuracy"] = float(compute_metrics(y[labelled], torch.softmax(b, 1).numpy()[labelled])
                                         ["balanced_accuracy"])
    return out


def quantize_checkpoint(plain: dict[str, Any]) -> dict[str, Any]:
    """Quantize plain["checkpoint"] to plain["out"]; returns what was measured."""
    from dermaid.compress.export import artifact_card, export_onnx, load_float_source
    from dermaid.compress.runtime import OnnxModel
    from dermaid.data.loading import load_records

    method = str(plain["method"])
    if method not in METHODS:
        raise DermaidError(f"method={method!r}: expected static or dynamic")
    quant_format = str(plain["quant_format"]).lower()
    if quant_format not in QUANT_FORMATS:
        raise DermaidError(f"quant_format={quant_format!r}: expected one of {list(QUANT_FORMATS)}")
    calibrate_method = str(plain["calibrate_method"]).lower()
    if calibrate_method not in CALIBRATE_METHODS:
        raise DermaidError(f"calibrate_method={calibrate_method!r}: expected one of {sorted(CALIBRATE_METHODS)}")
    source = absolute_url(str(plain["checkpoint"]))  # the card names it: saliency finds the float weights there
    model, card = load_float_source(source)  # refuses an artifact that is already quantized / exported
    n_calib = int(plain["calibration_images"])
    evaluate = bool(plain["evaluate"])
    batch_size = int(plain["batch_size"])
    fold = int(plain["data"]["fold"])
    seed = int(plain["seed"])

    version_url = None
    calibration = None
    if method == "static" or evaluate:
        version_url = resolve_data_version(plain, card)
    if method == "static":
        if n_calib <= 0:
            raise DermaidError(f"calibration_images={n_calib}: static quantization needs at least one image")
        train = load_records(version_url, split="train", fold=fold)
        if train.empty:
            raise DermaidError(f"{version_url}: the training split (fold {fold}) has no images to calibrate on")
        train = train.sample(n=min(n_calib, len(train)), random_state=seed)
        calibration = calibration_feeds(train, card, batch_size)

    started = time.perf_counter()
    onnx_bytes = export_onnx(model, card, int(plain["opset"]))
    float_stem = bool(plain["float_stem"])
    int8 = quantize_onnx(onnx_bytes, method, calibration, quant_format, bool(plain["per_channel"]),
                         calibrate_method, float_stem)
    seconds = time.perf_counter() - started
    runner = OnnxModel(int8, card.uses_metadata)
    measured: dict[str, Any] = {}
    if evaluate:
        val = load_records(version_url, split="val", fold=fold)
        if not val.empty:
            measured = compare_on_records(model, runner, val, card, batch_size)
    compression = {"method": method, "runtime": "onnxruntime", "quant_format": quant_format if method == "static"
                   else None, "per_channel": bool(plain["per_channel"]),
                   "calibration_images": sum(f["images"].shape[0] for f in calibration) if calibration else 0,
                   "calibrate_method": calibrate_method if method == "static" else None, "float_stem": float_stem,
                   "dataset_version": version_url.rstrip("/").rsplit("/", 1)[-1] if version_url else None,
                   "val": measured}
    out = str(plain["out"])
    save_checkpoint(out, artifact_card(card, source, METHODS[method], INT8_ARTIFACT, compression), artifact_bytes=int8)
    return {"out": out, "kind": METHODS[method], "bytes": len(int8), "float_bytes": len(onnx_bytes),
            "seconds": seconds, **measured, "calibration_images": compression["calibration_images"]}


def run_quantize(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid quantize checkpoint=CKPT method=static|dynamic [out=DIR] [calibration_images=N]`."""
    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "checkpoint"):
        raise DermaidError("checkpoint= is required: a float checkpoint directory (e.g. runs/tune/toy/best)")
    result = quantize_checkpoint(to_plain(cfg))
    print(f"{result['kind']}: {result['float_bytes'] / 1e6:.1f} MB float ONNX -> {result['bytes'] / 1e6:.1f} MB int8 "
          f"({result['calibration_images']} calibration images, {result['seconds']:.0f} s) -> {result['out']}/"
          f"{INT8_ARTIFACT} (+ {CARD_FILE})")
    if "agreement_top1" in result:
        line = f"validation ({result['num_images']} images): top-1 agreement with float {result['agreement_top1']:.3f}"
        if "balanced_accuracy" in result:
            line += (f", balanced accuracy {result['balanced_accuracy']:.4f} int8 vs "
                     f"{result['float/balanced_accuracy']:.4f} float")
        print(line)
    print(DISCLAIMER)
    return result
