"""Compression of trained checkpoints: distillation, int8 quantization, export (the `dermaid` commands).

    dermaid distill teacher=runs/tune/toy/best experiment=toy model.name=mobilenetv3_small_100
    dermaid quantize checkpoint=runs/tune/toy/best method=static|dynamic
    dermaid export checkpoint=runs/tune/toy/best format=onnx|torchscript
    .venv/bin/python benchmarks/compression_table.py checkpoint=runs/tune/toy/best student=runs/distill/toy/best

distill.py (KD loss + teacher: the loss hook `train.loss_hook` names for the trainer), quantize.py (ONNX Runtime int8),
export.py (ONNX / TorchScript + output check), runtime.py (the artifact loaders that
dermaid.inference.Predictor dispatches to by card.kind). Every output is a checkpoint directory
with a model card, so `dermaid evaluate`-style code, notebooks and `dermaid serve` read it the same way.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def run_distill(cfg: DictConfig) -> dict[str, Any]:
    from dermaid.compress.distill import run_distill as _run

    return _run(cfg)


def run_quantize(cfg: DictConfig) -> dict[str, Any]:
    from dermaid.compress.quantize import run_quantize as _run

    return _run(cfg)


def run_export(cfg: DictConfig) -> dict[str, Any]:
    from dermaid.compress.export import run_export as _run

    return _run(cfg)
