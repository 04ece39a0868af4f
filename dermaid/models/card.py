"""Checkpoint + model card: the one checkpoint format every DermAID component reads and writes.

A checkpoint is a directory (any fsspec URL) holding:
    card.json   the model card (below), written last
    model.pt    torch.save({"state_dict": ...}) for kind="float"
                (other kinds name their artifact in card["artifact"]: model.int8.pt, model.onnx, ...)

The card says everything needed to use the model without its training config:
    format_version, kind ("float" | "quantized_dynamic" | "quantized_static" | "onnx" | "torchscript"),
    artifact (file name), model (the `model` config group: name, use_metadata, ...),
    classes (code, name, description, malignant in output order), input (timm input spec),
    metadata (vocabularies; whether the model uses them), dataset_version(s), config (resolved),
    code_version, metrics, calibration ({"temperature": T}), epoch, teacher, created.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from dermaid import __version__
from dermaid.errors import DermaidError
from dermaid.classes import CLASS_CODES, SEXES, SITES, class_table
from dermaid.models.metadata import AGE_SCALE, METADATA_DIM
from dermaid.files import atomic_dir, exists, join, read_bytes, read_text, write_bytes, write_text

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.pt"
FORMAT_VERSION = 1


class CheckpointError(DermaidError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit what it is used for."""


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def build_card(
    model_cfg: dict[str, Any],
    input_spec: dict[str, Any],
    *,
    dataset_version: str | None = None,
    dataset_versions: list[str] | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    temperature: float = 1.0,
    epoch: int | None = None,
    teacher: str | None = None,
    kind: str = "float",
    artifact: str = WEIGHTS_FILE,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "artifact": artifact,
        "model": dict(model_cfg),
        "classes": class_table(),
        "input": dict(input_spec),
        "metadata": {
            "used": bool(model_cfg.get("use_metadata", True)),
            "dim": METADATA_DIM,
            "age_scale": AGE_SCALE,
            "sexes": list(SEXES),
            "sites": list(SITES),
        },
        "dataset_version": dataset_version,
        "dataset_versions": list(dataset_versions or ([dataset_version] if dataset_version else [])),
        "config": config or {},
        "code_version": code_version(),
        "metrics": metrics or {},
        "calibration": {"temperature": float(temperature)},
        "epoch": epoch,
        "teacher": teacher,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_checkpoint(url: str, card: dict[str, Any], state_dict: dict[str, Any] | None = None,
                    artifact_bytes: bytes | None = None) -> str:
    """Write a checkpoint directory atomically (temporary sibling, then moved into place)."""
    with atomic_dir(url) as tmp:
        if state_dict is not None:
            buf = io.BytesIO()
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}, buf)
            write_bytes(join(tmp, card["artifact"]), buf.getvalue())
        elif artifact_bytes is not None:
            write_bytes(join(tmp, card["artifact"]), artifact_bytes)
        write_text(join(tmp, CARD_FILE), json.dumps(card, indent=2, default=str))
    return url


def load_card(url: str) -> dict[str, Any]:
    card_url = join(url, CARD_FILE)
    if not exists(card_url):
        raise CheckpointError(f"{url}: not a DermAID checkpoint (no {CARD_FILE})")
    try:
        card = json.loads(read_text(card_url))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_url}: unreadable model card ({exc})") from None
    codes = [c["code"] for c in card.get("classes", [])]
    if tuple(codes) != CLASS_CODES:
        raise CheckpointError(f"{card_url}: the card's classes {codes} differ from DermAID's {list(CLASS_CODES)}")
    return card


def float_weights_for(url: str) -> str:
    """The checkpoint holding the float weights behind `url`: `url` itself, or, for a compressed artifact
    (ONNX, TorchScript, int8), the float checkpoint it was made from (its card's compression.source).
    Grad-CAM needs them (gradients flow through PyTorch modules only); clear errors when they are gone."""
    card = load_card(url)
    kind = card.get("kind", "float")
    if kind == "float":
        return url
    source = (card.get("compression") or {}).get("source")
    hint = "set explainer_checkpoint= to the float checkpoint it was made from"
    if not source:
        raise CheckpointError(f"{url}: a {kind} artifact that names no float source; "
                              f"Grad-CAM needs float weights: {hint}")
    try:
        source_kind = load_card(source).get("kind", "float")
    except CheckpointError as exc:
        raise CheckpointError(f"{url}: a {kind} artifact whose float source is unusable ({exc}); {hint}") from None
    if source_kind != "float":
        raise CheckpointError(f"{url}: a {kind} artifact whose source {source} is a {source_kind} artifact too; {hint}")
    return source


def load_state_dict(url: str, card: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    card = card or load_card(url)
    weights_url = join(url, card.get("artifact", WEIGHTS_FILE))
    if not exists(weights_url):
        raise CheckpointError(f"{url}: weights file {card.get('artifact')} is missing")
    try:
        blob = torch.load(io.BytesIO(read_bytes(weights_url)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{weights_url}: unreadable weights ({type(exc).__name__}: {exc})") from None
    return blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob


def load_float_model(url: str, device: str | torch.device = "cpu"):
    """Checkpoint URL -> (LesionClassifier in eval mode, card). Clear errors for misfits."""
    from dermaid.models.classifier import create_classifier

    card = load_card(url)
    if card.get("kind", "float") != "float":
        raise CheckpointError(f"{url}: a {card['kind']} artifact, not float weights")
    model = create_classifier(card["model"])
    state = load_state_dict(url, card)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"{url}: weights do not fit architecture {card['model'].get('name')!r}: {' '.join(first)}"
        ) from None
    return model.to(device).eval(), card
