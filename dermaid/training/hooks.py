"""Loss hooks: how another package changes the training loss without training importing it.

`train.loss_hook` names a hook class by import path ("package.module:Class"); null trains with the
plain (class-weighted) cross-entropy. conf/distill.yaml names dermaid.compress.distill:DistillationHook,
so knowledge distillation reaches the trainer from dermaid.compress and nothing here imports compress.

A hook class has:
    section                                   the top-level config key its settings are written under
    prepare(plain_config) -> settings         driver, before Ray starts: check inputs, resolve URLs (plain dict)
    Class(settings)                           each worker builds one from those settings
    hook.create_loss(hard_loss, input_spec, device) -> (loss_fn, teacher or None)
    hook.card_fields() -> dict                extra model-card fields (e.g. {"teacher": URL})

With a teacher, loop.train_one_epoch calls loss_fn(logits, labels, teacher(images, metadata)).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import nn

from dermaid.errors import DermaidError


class LossHook(Protocol):
    """What the worker calls on a hook built from its settings."""

    section: str

    @classmethod
    def prepare(cls, plain: dict[str, Any]) -> dict[str, Any]: ...

    def create_loss(self, hard_loss: nn.Module, input_spec: dict[str, Any],
                    device: torch.device) -> tuple[nn.Module, nn.Module | None]: ...

    def card_fields(self) -> dict[str, Any]: ...


def load_loss_hook(path: str) -> type[LossHook]:
    """"package.module:Class" -> the hook class; a clear error naming train.loss_hook otherwise."""
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise DermaidError(f"train.loss_hook={path!r}: expected 'package.module:Class'")
    try:
        hook = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise DermaidError(f"train.loss_hook={path!r}: cannot be imported ({exc})") from None
    missing = [name for name in ("section", "prepare", "create_loss", "card_fields") if not hasattr(hook, name)]
    if missing:
        raise DermaidError(f"train.loss_hook={path!r}: not a loss hook (missing {', '.join(missing)})")
    return hook
