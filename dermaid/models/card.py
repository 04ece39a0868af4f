"""Checkpoint + model card: the one checkpoint format every DermAID component reads and writes.

A checkpoint is a directory (any fsspec URL) holding:
    card.json   the model card (below), written last
    model.pt    torch.save({"state_dict": ...}) for kind="float"; a checkpoint replaced on an object store names
                a fresh model-v<UTC stamp>-<id>.pt in its card's `artifact` (save_checkpoint)
                (other kinds name their artifact in the card's `artifact`: model.int8.onnx, model.onnx, ...)

The card (`ModelCard`, a typed, versioned record; card.json is its `to_dict()`) says everything needed
to use the model without its training config:
    format_version (1; a card written without it is version 1), kind ("float" | "quantized_dynamic" |
    "quantized_static" | "onnx" | "torchscript"), artifact (file name), model (the `model` config group:
    name, use_metadata, ...), classes (code, name, description, malignant in output order), input (timm
    input spec), metadata (vocabularies; whether the model uses them), dataset_version(s), config
    (resolved), code_version, metrics, calibration ({"temperature": T}), epoch, teacher, created, and for a
    compressed artifact compression ({"source": float checkpoint URL, ...how it was made}).
    Optional blocks written by `dermaid calibrate` (dermaid.evaluation.calibrate): ood ({"method",
    "statistics" (file beside the weights), "threshold", "refuse_share", "scale", "validation" per method,
    "fitted_on"}) and triage ({"cutoff", "target_sensitivity", "sensitivity", "specificity", "tp", "fn", "tn",
    "fp", "malignant_codes"}). Written by training: preparation (dermaid.data.shards.preparation_block: the
    prepare rule, image_size and JPEG quality of the training data; the Predictor repeats it on uploads).
    Written by `dermaid ensemble` / `dermaid cv` for kind "ensemble" (dermaid.models.ensemble): ensemble ({"members":
    [{"path" (inside the ensemble directory), "source", "model_version", ...}], "combine"}).
    Being optional, they leave format_version at 1: older cards load without them (card.ood / card.triage /
    card.preparation are None) and older code keeps them in `extra` on re-save.

    card = load_card("runs/toy/best")        # CheckpointError: missing, unreadable, unknown format_version
    card.model_name, card.input_size, card.temperature, card.uses_metadata, card.compression_source
    save_checkpoint(url, build_card(model_cfg, input_spec, temperature=1.2), model.state_dict())
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermaid import __version__
from dermaid.errors import DermaidError
from dermaid.classes import CLASS_CODES, SEXES, SITES, class_table
from dermaid.files import (atomic_dir, exists, get_fs, is_local, join, read_bytes, read_text, versioned_name,
                           write_bytes, write_text)

if TYPE_CHECKING:  # torch is imported where weights are read or written: the serving front (launcher, Ingress)
    import torch   # reads cards without paying torch's import (seconds of a cold start)

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.pt"
FORMAT_VERSION = 1                 # the card layout this code writes
READABLE_FORMAT_VERSIONS = (1,)    # the card layouts this code reads
FLOAT_KIND = "float"


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


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def metadata_vocabulary(used: bool) -> dict[str, Any]:
    """The card's `metadata` block: whether the model reads metadata, and the encoding it was trained with."""
    from dermaid.models.metadata import AGE_SCALE, METADATA_DIM

    return {"used": bool(used), "dim": METADATA_DIM, "age_scale": AGE_SCALE, "sexes": list(SEXES), "sites": list(SITES)}


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """One checkpoint's model card. Field order is card.json's key order."""

    format_version: int = FORMAT_VERSION
    kind: str = FLOAT_KIND
    artifact: str = WEIGHTS_FILE
    model: dict[str, Any]                      # the `model` config group (name, use_metadata, ...)
    classes: list[dict[str, Any]] = field(default_factory=class_table)   # output order
    input: dict[str, Any]                      # timm input spec: input_size, mean, std, crop_pct, ...
    metadata: dict[str, Any] = field(default_factory=dict)  # metadata_vocabulary(...); {} on the oldest cards
    dataset_version: str | None = None
    dataset_versions: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=lambda: {"temperature": 1.0})
    epoch: int | None = None
    teacher: str | None = None
    created: str | None = None
    compression: dict[str, Any] | None = None  # compressed artifacts only: {"source": float checkpoint, ...}
    ood: dict[str, Any] | None = None          # `dermaid calibrate`: the OOD detector (method, statistics, threshold)
    triage: dict[str, Any] | None = None       # `dermaid calibrate`: the validation-chosen triage cut-off
    preparation: dict[str, Any] | None = None  # training: how prepare made the images (dermaid.data.shards)
    ensemble: dict[str, Any] | None = None     # kind "ensemble" only: its members (dermaid.models.ensemble)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept on re-save

    # --- typed reads -----------------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The timm backbone name (the `model.name` config key)."""
        return str(self.model["name"])

    @property
    def class_codes(self) -> tuple[str, ...]:
        """The class codes in output order (always dermaid.classes.CLASS_CODES for a loaded card)."""
        return tuple(str(c["code"]) for c in self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of the model input."""
        channels, height, width = (int(v) for v in self.input["input_size"])
        return channels, height, width

    @property
    def uses_metadata(self) -> bool:
        """Whether the model reads the metadata vector (cards without a metadata block: yes)."""
        return bool(self.metadata.get("used", True))

    @property
    def temperature(self) -> float:
        """The calibration temperature T (probabilities are softmax(logits / T)); 1.0 when none was fitted."""
        return float(self.calibration.get("temperature") or 1.0)

    @property
    def is_float(self) -> bool:
        """Float torch weights (Grad-CAM and re-compression need them), not a compressed artifact."""
        return self.kind == FLOAT_KIND

    @property
    def compression_source(self) -> str | None:
        """For a compressed artifact: the float checkpoint it was made from (None when not recorded)."""
        return (self.compression or {}).get("source") or None

    @property
    def trained_on(self) -> list[str]:
        """Every dataset version the weights saw (a fine-tuned card lists its source's too)."""
        return list(self.dataset_versions or ([self.dataset_version] if self.dataset_version else []))

    @property
    def ood_method(self) -> str | None:
        """The OOD detector the card's `ood` block names (None: no detector; run `dermaid calibrate`)."""
        return str(self.ood["method"]) if self.ood else None

    @property
    def triage_cutoff(self) -> float | None:
        """The validation-chosen "see a doctor soon" cut-off on the malignancy score (None when not chosen)."""
        return float(self.triage["cutoff"]) if self.triage else None

    # --- JSON ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The card.json content (a compressed artifact's `compression` only when present)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for optional in ("compression", "ood", "triage", "preparation", "ensemble"):
            if data[optional] is None:
                del data[optional]
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CARD_FILE) -> ModelCard:
        """card.json content -> ModelCard. CheckpointError (naming `source`) for an unknown format_version,
        other classes than DermAID's, or a card without its model or input spec."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: a model card must be a JSON object, not {type(data).__name__}")
        version = data.get("format_version", 1)  # cards written before the field existed are version 1
        if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
            raise CheckpointError(f"{source}: model card format_version {version!r} is not one this DermAID reads "
                                  f"({list(READABLE_FORMAT_VERSIONS)}); upgrade DermAID to use this checkpoint")
        codes = [c.get("code") for c in data.get("classes") or []]
        if tuple(codes) != CLASS_CODES:
            raise CheckpointError(f"{source}: the card's classes {codes} differ from DermAID's {list(CLASS_CODES)}")
        for key in ("model", "input"):
            if not isinstance(data.get(key), dict):
                raise CheckpointError(f"{source}: the model card has no {key!r} block")
        if not data["model"].get("name"):
            raise CheckpointError(f"{source}: the model card names no model (model.name)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {key: value for key, value in data.items() if key in known}
        values["format_version"] = version
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    def with_calibration(self, ood: dict[str, Any] | None, triage: dict[str, Any] | None) -> ModelCard:
        """This card with new `ood` and `triage` blocks (`dermaid calibrate`); nothing else changes."""
        return dataclasses.replace(self, ood=ood, triage=triage)

    def derived(self, kind: str, artifact: str, compression: dict[str, Any]) -> ModelCard:
        """This card for an artifact made from it (export, quantization): new kind, artifact and provenance."""
        return dataclasses.replace(self, kind=kind, artifact=artifact, code_version=code_version(),
                                   created=_utc_now(), compression=dict(compression),
                                   ood=None)  # the OOD statistics stay with the float weights (calibrate those)


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
    preparation: dict[str, Any] | None = None,
    kind: str = FLOAT_KIND,
    artifact: str = WEIGHTS_FILE,
) -> ModelCard:
    """The card of newly trained weights; `model_cfg` is the `model` config group (name, use_metadata, ...)."""
    return ModelCard(
        kind=kind,
        artifact=artifact,
        model=dict(model_cfg),
        input=dict(input_spec),
        metadata=metadata_vocabulary(model_cfg["use_metadata"]),
        dataset_version=dataset_version,
        dataset_versions=list(dataset_versions or ([dataset_version] if dataset_version else [])),
        config=config or {},
        code_version=code_version(),
        metrics=metrics or {},
        calibration={"temperature": float(temperature)},
        epoch=epoch,
        teacher=teacher,
        created=_utc_now(),
        preparation=dict(preparation) if preparation else None,
    )


def save_checkpoint(url: str, card: ModelCard, state_dict: dict[str, Any] | None = None,
                    artifact_bytes: bytes | None = None) -> str:
    """Write a checkpoint directory atomically (temporary sibling, then moved into place: dermaid.files.atomic_dir).

    Replacing a checkpoint on an object store (best/ and last/ from the second epoch on), the artifact gets a
    fresh name (dermaid.files.versioned_name: model-v<UTC stamp>-<id>.pt) written into the card's `artifact`, so
    the new weights never overwrite the ones the old card names and the directory is replaced in place, never
    absent (old card or new card, each with its own weights); the old weights are removed after the card switch.
    On local disk (one atomic rename) and for a new directory the card's name stays (model.pt)."""
    if (state_dict is not None or artifact_bytes is not None) and not is_local(url) and exists(url):
        card = dataclasses.replace(card, artifact=versioned_name(card.artifact))
    with atomic_dir(url) as tmp:
        if state_dict is not None:
            import torch

            buf = io.BytesIO()
            torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}, buf)
            write_bytes(join(tmp, card.artifact), buf.getvalue())
        elif artifact_bytes is not None:
            write_bytes(join(tmp, card.artifact), artifact_bytes)
        write_text(join(tmp, CARD_FILE), json.dumps(card.to_dict(), indent=2, default=str))
    return url


def replace_card(url: str, card: ModelCard) -> str:
    """Rewrite only `url`/card.json (the weights stay): written beside it, then moved over it in one step."""
    fs, path = get_fs(join(url, CARD_FILE))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(card.to_dict(), indent=2, default=str).encode("utf-8"))
    if is_local(url):
        os.replace(tmp, path)  # atomic on one filesystem
    else:
        fs.mv(tmp, path)
    return url


def model_version(card: ModelCard) -> str:
    """A stable id for a checkpoint: backbone name + kind + a short hash of its model card."""
    digest = hashlib.sha256(json.dumps(card.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{card.model_name}-{card.kind}-{digest}"


def load_card(url: str) -> ModelCard:
    """A checkpoint directory's model card. CheckpointError when missing, unreadable or from another format."""
    card_url = join(url, CARD_FILE)
    if not exists(card_url):
        raise CheckpointError(f"{url}: not a DermAID checkpoint (no {CARD_FILE})")
    try:
        data = json.loads(read_text(card_url))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_url}: unreadable model card ({exc})") from None
    return ModelCard.from_dict(data, source=card_url)


def float_weights_for(url: str) -> str:
    """The checkpoint holding the float weights behind `url`: `url` itself, or, for a compressed artifact
    (ONNX, TorchScript, int8), the float checkpoint it was made from (its card's compression.source).
    Grad-CAM needs them (gradients flow through PyTorch modules only); clear errors when they are gone."""
    card = load_card(url)
    if card.is_float or card.kind == "ensemble":  # an ensemble's Grad-CAM takes each member's float weights itself
        return url
    source = card.compression_source
    hint = "set explainer_checkpoint= to the float checkpoint it was made from"
    if not source:
        raise CheckpointError(f"{url}: a {card.kind} artifact that names no float source; "
                              f"Grad-CAM needs float weights: {hint}")
    try:
        source_kind = load_card(source).kind
    except CheckpointError as exc:
        raise CheckpointError(f"{url}: a {card.kind} artifact whose float source is unusable ({exc}); {hint}") from None
    if source_kind != FLOAT_KIND:
        raise CheckpointError(f"{url}: a {card.kind} artifact whose source {source} is a {source_kind} artifact too; "
                              f"{hint}")
    return source


def load_state_dict(url: str, card: ModelCard | None = None) -> dict[str, torch.Tensor]:
    card = card or load_card(url)
    weights_url = join(url, card.artifact)
    if not exists(weights_url):
        now = _current_artifact(url)
        if now is not None and now != card.artifact:  # replaced in place between our card read and this one
            raise CheckpointError(f"{url} was replaced while it was being read (its card now names {now}, not "
                                  f"{card.artifact}); load it again")
        raise CheckpointError(f"{url}: weights file {card.artifact} is missing")
    import torch

    try:
        blob = torch.load(io.BytesIO(read_bytes(weights_url)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{weights_url}: unreadable weights ({type(exc).__name__}: {exc})") from None
    return blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob


def _current_artifact(url: str) -> str | None:
    """The artifact `url`'s card names now; None when it cannot be read."""
    try:
        return load_card(url).artifact
    except CheckpointError:
        return None


def load_float_model(url: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Checkpoint URL -> (LesionClassifier in eval mode, card). Clear errors for misfits."""
    from dermaid.models.classifier import create_classifier

    card = load_card(url)
    if not card.is_float:
        raise CheckpointError(f"{url}: a {card.kind} artifact, not float weights")
    model = create_classifier(card.model, pretrained_weights=False)  # the checkpoint's weights replace them
    state = load_state_dict(url, card)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"{url}: weights do not fit architecture {card.model_name!r}: {' '.join(first)}"
        ) from None
    return model.to(device).eval(), card
