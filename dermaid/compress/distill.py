"""Knowledge distillation: the `dermaid train` trainer with a KD loss against a frozen teacher.

    dermaid distill teacher=runs/tune/toy/best experiment=toy model.name=mobilenetv3_small_100
    dermaid distill teacher=runs/isic/best model.name=efficientnet_b0 distill.alpha=0.5 distill.temperature=2

conf/distill.yaml sets `train.loss_hook: dermaid.compress.distill:DistillationHook` (a loss hook,
dermaid.training.hooks: training never imports this package). The driver calls
`DistillationHook.prepare` (check_distill: the `distill` block {teacher, alpha, temperature}) before Ray
starts; each worker builds the hook, which loads the teacher (frozen, eval mode) with `create_teacher`
and wraps the trainer's loss in `DistillationLoss`; loop.py feeds each batch to both. The result is an
ordinary checkpoint whose model card names its teacher.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)
(Hinton et al., 2015: T^2 keeps the soft term's gradients on the scale of the hard term's.)
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dermaid.classes import CLASS_CODES
from dermaid.errors import DermaidError
from dermaid.files import exists, join, read_text

TEACHER_REQUIRED = "teacher= is required: the checkpoint to distil from (e.g. runs/tune/toy/best)"
from dermaid.models.card import ModelCard


class DistillationLoss(nn.Module):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard loss (the trainer's weighted CE)."""

    def __init__(self, hard_loss: nn.Module, alpha: float, temperature: float) -> None:
        super().__init__()
        self.hard_loss = hard_loss
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                        reduction="batchmean", log_target=True) * (t * t)  # () over (B, K)
        return self.alpha * soft + (1.0 - self.alpha) * self.hard_loss(logits, labels)


class TeacherModel(nn.Module):
    """A frozen teacher that takes the student's batches: re-normalised and resized to its own input spec."""

    def __init__(self, model: nn.Module, student_spec: dict[str, Any], teacher_spec: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.size = int(teacher_spec["input_size"][-1])
        self.register_buffer("scale", _channel(student_spec["std"]) / _channel(teacher_spec["std"]))
        self.register_buffer("shift", (_channel(student_spec["mean"]) - _channel(teacher_spec["mean"]))
                             / _channel(teacher_spec["std"]))
        self.identity = (student_spec["mean"] == teacher_spec["mean"] and student_spec["std"] == teacher_spec["std"])

    def train(self, mode: bool = True) -> "TeacherModel":
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay fixed

    @torch.no_grad()
    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        if not self.identity:
            images = images * self.scale + self.shift  # (B, 3, H, W) in the teacher's normalisation
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.model(images, metadata)  # (B, K)


def _channel(values: list[float]) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(1, 3, 1, 1)  # (1, 3, 1, 1)


def create_teacher(teacher_url: str, student_spec: dict[str, Any], device: torch.device) -> TeacherModel:
    """Load the teacher checkpoint (float weights) as a frozen TeacherModel on `device`."""
    from dermaid.models.card import load_float_model

    model, card = load_float_model(teacher_url, device)
    return TeacherModel(model, student_spec, card.input).to(device)


def check_distill(distill: dict[str, Any], absolute=lambda url: url) -> dict[str, Any]:
    """Validate the `distill` block before any worker starts; returns it with an absolute teacher URL.

    Clear errors for a missing or unreadable teacher, a teacher whose classes differ from the
    student's, a compressed (non-float) teacher and alpha/temperature out of range.
    """
    if not distill["teacher"]:
        raise DermaidError(TEACHER_REQUIRED)
    teacher = absolute(str(distill["teacher"]))
    card_url = join(teacher, "card.json")
    if not exists(card_url):
        raise DermaidError(f"distill.teacher={teacher}: not a DermAID checkpoint (no card.json)")
    try:
        data = json.loads(read_text(card_url))
    except (OSError, ValueError) as exc:
        raise DermaidError(f"distill.teacher={teacher}: unreadable model card ({exc})") from None
    codes = [c.get("code") for c in data.get("classes", [])]  # read raw: the mismatch explained for a teacher
    if tuple(codes) != CLASS_CODES:
        raise DermaidError(f"distill.teacher={teacher}: the teacher predicts classes {codes}, the student "
                           f"{list(CLASS_CODES)}; a teacher must predict the student's classes in the same order")
    card = ModelCard.from_dict(data, source=card_url)  # CheckpointError for an unknown format_version
    if not card.is_float:
        raise DermaidError(f"distill.teacher={teacher}: a {card.kind} artifact; distillation needs the "
                           "teacher's float checkpoint (its logits and BatchNorm in eval mode)")
    alpha, temperature = float(distill["alpha"]), float(distill["temperature"])
    if not 0.0 <= alpha <= 1.0:
        raise DermaidError(f"distill.alpha={alpha}: must be in [0, 1] (the weight of the KD term)")
    if temperature <= 0:
        raise DermaidError(f"distill.temperature={temperature}: must be positive")
    return {"teacher": teacher, "alpha": alpha, "temperature": temperature,
            "teacher_model": card.model_name}


class DistillationHook:
    """The loss hook conf/distill.yaml names (train.loss_hook; protocol in dermaid.training.hooks)."""

    section = "distill"  # config.yaml and the card's config keep the checked block under this key

    @classmethod
    def prepare(cls, plain: dict[str, Any]) -> dict[str, Any]:
        """Driver side, before Ray starts: the checked `distill` block (absolute teacher URL)."""
        from dermaid.files import absolute_url

        return check_distill(plain["distill"], absolute_url)

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def create_loss(self, hard_loss: nn.Module, input_spec: dict[str, Any],
                    device: torch.device) -> tuple[nn.Module, nn.Module]:
        """Worker side: (KD loss around the trainer's hard loss, the frozen teacher on `device`)."""
        teacher = create_teacher(self.settings["teacher"], input_spec, device)
        return DistillationLoss(hard_loss, self.settings["alpha"], self.settings["temperature"]), teacher

    def card_fields(self) -> dict[str, Any]:
        return {"teacher": self.settings["teacher"]}


def run_distill(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid distill teacher=CKPT model.name=STUDENT ...`: `dermaid train` with the KD loss."""
    from dermaid.config import to_plain
    from dermaid.training.driver import run as run_train

    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "teacher"):
        raise DermaidError(TEACHER_REQUIRED)
    plain = to_plain(cfg)
    if not plain["distill"]["teacher"]:
        raise DermaidError(TEACHER_REQUIRED)
    summary = run_train(cfg)
    print(f"student {summary['model']['name']} distilled from {plain['distill']['teacher']}")
    return summary
