"""The training and prediction loops in plain PyTorch: no Ray, pandas or Hydra import here.

worker.py calls these inside each Ray Train worker; benchmarks/train_throughput.py runs the same
`train_one_epoch` with torch and timm alone; evaluation and Serve share `predict_probabilities`.

A batch is a tuple (images (B, 3, H, W) float, metadata (B, METADATA_DIM) float, labels (B,) long).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermaid.models.metadata import drop_metadata

TTA_CHOICES = (0, 1, 2, 4, 8)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """amp in {"auto", "bf16", "fp16", "off"} -> the autocast dtype (None = full precision).

    "auto" is bf16 on a GPU that supports it (fp16 otherwise) and off on CPU, where autocast is slow.
    """
    amp = (amp or "off").lower()
    if amp in ("off", "none", "false", "fp32"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"train.amp={amp!r}: expected auto, bf16, fp16 or off")


def resolve_channels_last(flag: Any, device: torch.device) -> bool:
    """channels_last in {"auto", true, false}: auto = on for GPUs (faster convolutions), off on CPU."""
    if isinstance(flag, str) and flag.lower() == "auto":
        return device.type == "cuda"
    return bool(flag)


def create_optimizer(model: nn.Module, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.999), backbone_lr_scale: float = 1.0,
                     layer_decay: float | None = None) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norm weights; optional lower lr for the backbone.

    layer_decay: layer-wise lr decay inside the backbone (BEiT-style, timm.optim.param_groups_layer_decay
    over the backbone's group_matcher): its last block keeps the backbone lr, each earlier block gets
    `layer_decay` times the one after it. The head and the metadata branch always train at `lr`.
    """
    inner = getattr(model, "module", model)  # DDP's wrapped model: the same parameter objects
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in inner.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.split(".", 1)[0] == "backbone"
        if in_backbone and layer_decay:
            continue  # grouped per layer below
        decay = param.ndim > 1
        groups.setdefault((in_backbone, decay), []).append(param)
    param_groups = [
        {"params": params, "weight_decay": weight_decay if decay else 0.0,
         "lr": lr * (backbone_lr_scale if in_backbone else 1.0)}
        for (in_backbone, decay), params in groups.items()
    ]
    if layer_decay:
        from timm.optim import param_groups_layer_decay

        backbone = inner.backbone
        skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        for group in param_groups_layer_decay(backbone, weight_decay, no_weight_decay_list=skip,
                                              layer_decay=float(layer_decay)):
            scale = group.pop("lr_scale")
            param_groups.append({**group, "lr": lr * backbone_lr_scale * scale})
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas))


def create_ema(model: nn.Module, decay: float | None) -> Any | None:
    """An exponential moving average of `model`'s weights (timm.utils.ModelEmaV3), or None when decay is unset.

    The decay warms up (timm's use_warmup: 1 - (1 + step)^-2/3, capped at `decay`), so short runs and the
    first epochs average over the steps there are rather than over the random initial weights.
    """
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(getattr(model, "module", model), decay=float(decay), use_warmup=True)


def create_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                           min_lr_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr, then cosine decay to min_lr_ratio * base lr (stepped per batch)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def compute_class_weights(counts: list[int] | np.ndarray, power: float = 1.0) -> torch.Tensor:
    """Per-class loss weights (1 / count) ** power, normalised to mean 1 over the classes present."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = (1.0 / counts[present]) ** power
    if present.any():
        weights[present] /= weights[present].mean()
    return torch.as_tensor(weights, dtype=torch.float32)


def _to_device(batch, device: torch.device, channels_last: bool):
    images, metadata, labels = batch
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, H, W)
    return images, metadata.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    metadata_dropout: float = 0.0,
    grad_clip: float | None = None,
    max_steps: int | None = None,
    teacher: nn.Module | None = None,
    ema: Any | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns {"loss", "samples", "steps", "seconds", "images_per_s"}.

    teacher: a frozen model for knowledge distillation; then loss_fn(logits, labels, teacher_logits).
    ema: create_ema's average, updated after every optimiser step (its warm-up counts the scheduler's steps).
    """
    model.train()
    start = time.perf_counter()
    total_loss = torch.zeros((), device=device)
    samples = steps = 0
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        images, metadata, labels = _to_device(batch, device, channels_last)
        if metadata_dropout > 0:
            metadata = drop_metadata(metadata, metadata_dropout)  # (B, METADATA_DIM)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images, metadata)  # (B, K)
            if teacher is None:
                loss = loss_fn(logits.float(), labels)
            else:
                teacher_logits = teacher(images, metadata)  # (B, K), no gradients
                loss = loss_fn(logits.float(), labels, teacher_logits.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(getattr(model, "module", model), step=scheduler.last_epoch if scheduler is not None else None)
        total_loss += loss.detach() * labels.shape[0]
        samples += int(labels.shape[0])
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "loss": float(total_loss) / max(1, samples),
        "samples": samples,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": samples / seconds if seconds > 0 else 0.0,
    }


def tta_views(images: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Test-time views of a (B, C, H, W) batch: the dihedral group's first n of
    identity, h-flip, v-flip, rot180, rot90, rot270, transpose, anti-transpose."""
    if n not in TTA_CHOICES:
        raise ValueError(f"tta={n}: expected one of {TTA_CHOICES}")
    views = [
        images,
        images.flip(-1),
        images.flip(-2),
        images.flip(-1).flip(-2),
        images.rot90(1, (-2, -1)),
        images.rot90(3, (-2, -1)),
        images.transpose(-2, -1),
        images.flip(-1).flip(-2).transpose(-2, -1),
    ]
    return views[: max(1, n)]


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every view of every image: ((N, V, K) float32 on CPU, labels (N,) long).

    V = max(1, tta). Use a plain (unwrapped) model: no collective ops run here.
    """
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        images, metadata, labels = _to_device(batch, device, channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        views = []
        for view in tta_views(images, tta):
            view = view.contiguous(memory_format=memory_format)  # (B, 3, H, W)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                views.append(model(view, metadata).float())  # (B, K)
        all_logits.append(torch.stack(views, dim=1).cpu())  # (B, V, K)
        all_labels.append(labels.cpu())
    if not all_logits:
        return torch.zeros(0, max(1, tta), 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def probabilities_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """(N, V, K) or (N, K) logits -> (N, K) probabilities: softmax(logits / T), averaged over views."""
    if logits.ndim == 2:
        logits = logits.unsqueeze(1)  # (N, 1, K)
    return F.softmax(logits.double() / float(temperature), dim=-1).mean(dim=1).numpy()


def predict_probabilities(
    model: nn.Module,
    records_or_loader: Any,
    temperature: float = 1.0,
    tta: int = 0,
    device: str | torch.device = "cpu",
    input_spec: dict[str, Any] | None = None,
    batch_size: int = 32,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Calibrated class probabilities (N, K) for records or a loader: the one prediction path.

    records_or_loader: a loader of (images, metadata, labels) batches, or records (a DataFrame or a
    list of dicts with `image` JPEG/PNG bytes and optional `age`, `sex`, `site`), decoded with
    open_image and create_eval_transform(input_spec) (the card's "input").
    """
    device = torch.device(device)
    loader = records_or_loader
    if _is_records(records_or_loader):
        if input_spec is None:
            raise ValueError("predict_probabilities: records need the card's input spec (input_spec=card.input)")
        from dermaid.data.torch_dataset import create_eval_loader

        loader = create_eval_loader(records_or_loader, input_spec, batch_size=batch_size)
    logits, _ = predict_logits(model, loader, device, amp_dtype, channels_last, tta)
    return probabilities_from_logits(logits, temperature)


def _is_records(obj: Any) -> bool:
    """A DataFrame or a list of dicts (records); anything else is an iterable of batches."""
    if hasattr(obj, "columns"):
        return True
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and isinstance(obj[0], dict)
