"""The classifier: any timm backbone, an optional metadata branch, and the 8-class head.

    create_classifier({"name": "efficientnet_b0", "pretrained": False, "use_metadata": True})
    create_classifier({"name": "efficientnet_b3", "pretrained_file": "gs://bucket/weights/efficientnet_b3.pth"})

Backbone weights come from the timm hub (`pretrained: true`, online) or from a file or any fsspec URL
(`pretrained_file`, offline): a timm-format state dict (what the hub's `timm/...` repositories hold,
.pth/.bin/.safetensors, bare or under a state_dict/model/state_dict_ema key), or a DermAID checkpoint's
model.pt (its backbone part). The file must fit the architecture exactly (only the ImageNet classifier,
which the backbone drops, may be extra): a file for another architecture is refused, naming both.

forward(images (B, 3, H, W), metadata (B, METADATA_DIM) | None) -> logits (B, NUM_CLASSES)
forward_with_features(images, metadata) -> (features (B, D), logits (B, NUM_CLASSES)): the OOD detectors'
    features (dermaid.evaluation.ood), laid out as `feature_layout` says: first what the head sees (pooled
    backbone features joined with the metadata branch, before dropout; columns "head"), then per timm feature
    level (backbone.feature_info: stem to last stage) its activations' per-channel spatial mean and std
    (columns "level0", "level1", ...). Early levels carry the image statistics (colour, texture, sharpness)
    that tell a blank wall or a blurred thumb from a lesion photo; the head's features alone do not.
"""

from __future__ import annotations

import difflib
import io
import json
import threading
from typing import Any

import timm
import torch
from torch import nn

from dermaid.classes import NUM_CLASSES
from dermaid.errors import DermaidError
from dermaid.models.metadata import METADATA_DIM, missing_metadata


class PretrainedFileError(DermaidError, ValueError):
    """`model.pretrained_file` is missing, unreadable, or holds weights of another architecture."""


class LesionClassifier(nn.Module):
    """timm backbone (pooled features) + optional metadata MLP, joined before a linear head."""

    def __init__(
        self,
        name: str = "efficientnet_b0",
        pretrained: bool = False,
        use_metadata: bool = True,
        metadata_hidden: int = 32,
        drop_rate: float = 0.2,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        check_backbone_name(name)
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0)
        self.name = name
        self.use_metadata = use_metadata
        # pooled feature width: timm models with a pre-logits head (mobilenetv3, ...) expose head_hidden_size
        features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        if use_metadata:
            self.metadata_branch = nn.Sequential(
                nn.Linear(METADATA_DIM, metadata_hidden),
                nn.BatchNorm1d(metadata_hidden),
                nn.SiLU(),
                nn.Linear(metadata_hidden, metadata_hidden),
                nn.SiLU(),
            )
            features += metadata_hidden
        else:
            self.metadata_branch = None
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(features, num_classes)

    @property
    def feature_levels(self) -> list[tuple[str, int]]:
        """(module name, channels) of each timm feature level (empty for a backbone without feature_info)."""
        return [(str(info["module"]), int(info["num_chs"])) for info in getattr(self.backbone, "feature_info", [])]

    @property
    def feature_layout(self) -> dict[str, tuple[int, int]]:
        """Column ranges [start, stop) of forward_with_features' features: "head", then "level0", "level1", ..."""
        layout, start = {"head": (0, int(self.head.in_features))}, int(self.head.in_features)
        for index, (_, channels) in enumerate(self.feature_levels):
            layout[f"level{index}"] = (start, start + 2 * channels)  # per-channel mean | std
            start += 2 * channels
        return layout

    @property
    def feature_dim(self) -> int:
        """D: the width of the features forward_with_features returns (head input + feature-level statistics)."""
        return max(stop for _, stop in self.feature_layout.values())

    def _head_features(self, images: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        feats = self.backbone(images)  # (B, F)
        if self.metadata_branch is not None:
            if metadata is None:
                metadata = missing_metadata(images.shape[0]).to(images.device)
            meta_feats = self.metadata_branch(metadata.to(feats.dtype))  # (B, M)
            feats = torch.cat([feats, meta_feats], dim=1)  # (B, F + M)
        return feats  # (B, F [+ M])

    def forward_with_features(self, images: torch.Tensor,
                              metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, D) as feature_layout says, logits (B, NUM_CLASSES) exactly as forward gives them)."""
        modules = [self.backbone.get_submodule(name) for name, _ in self.feature_levels]
        pooled: list[torch.Tensor | None] = [None] * len(modules)
        # a module's hooks fire for every thread's forward through it: a serving replica runs forwards on two
        # threads (serve/lanes.py) through one model, so each call keeps only its own thread's activations
        owner = threading.get_ident()

        def keep(index: int):
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
                if threading.get_ident() != owner:
                    return
                flat = output.float().flatten(2)  # (B, C_l, H_l * W_l)
                mean = flat.mean(dim=2)  # (B, C_l)
                # population std from E[x^2] - E[x]^2: 5x faster than torch.std_mean on CPU, exact enough here
                std = ((flat * flat).mean(dim=2) - mean * mean).clamp_min(0.0).sqrt()  # (B, C_l)
                pooled[index] = torch.cat([mean, std], dim=1)  # (B, 2 C_l)
            return hook

        handles = [module.register_forward_hook(keep(index)) for index, module in enumerate(modules)]
        try:
            feats = self._head_features(images, metadata)  # (B, F [+ M])
        finally:
            for handle in handles:
                handle.remove()
        features = torch.cat([feats, *(level.to(feats.dtype) for level in pooled)], dim=1)  # (B, D)
        return features, self.head(self.dropout(feats))  # (B, D), (B, NUM_CLASSES)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self._head_features(images, metadata)))  # (B, NUM_CLASSES)


# the `model` keys that shape the network, with their types; the rest (metadata_dropout) is training-only
_ARCHITECTURE_KEYS = {"use_metadata": bool, "metadata_hidden": int, "drop_rate": float}


def create_classifier(model_cfg: dict[str, Any], pretrained_weights: bool = True) -> LesionClassifier:
    """Build the classifier from the `model` config group or a card's `model` block (a plain dict).

    `name` is required; a key a card or test leaves out takes LesionClassifier's own default (the
    composed `model` group always sets every key). pretrained_weights: load the backbone's starting
    weights (`pretrained_file` if set, else the timm hub when `pretrained`); False builds the architecture
    only, for weights that replace them anyway (a checkpoint, a resumed or fine-tuned run): no hub access.
    """
    given = {key: cast(model_cfg[key]) for key, cast in _ARCHITECTURE_KEYS.items() if key in model_cfg}
    pretrained_file = model_cfg.get("pretrained_file") if pretrained_weights else None
    hub = pretrained_weights and bool(model_cfg.get("pretrained")) and not pretrained_file
    model = LesionClassifier(name=model_cfg["name"], pretrained=hub, **given)
    if pretrained_file:
        load_pretrained_file(model.backbone, str(pretrained_file), model_cfg["name"])
    return model


def check_backbone_name(name: str) -> None:
    """A DermaidError listing close timm names when timm does not know `name` (a typo in a recipe or override)."""
    base = str(name).split(".", 1)[0]  # "efficientnet_b3.ra2_in1k": a pretrained tag after the architecture
    if timm.is_model(base):
        return
    known = timm.list_models()
    starting = [n for n in known if n.startswith(base)]  # "eva02_small" -> eva02_small_patch14_224, ...
    close = list(dict.fromkeys(starting[:5] + difflib.get_close_matches(base, known, n=5, cutoff=0.6)))[:8]
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise DermaidError(f"model.name={name!r}: timm {timm.__version__} has no such backbone{hint}")


def load_pretrained_file(backbone: nn.Module, url: str, name: str) -> None:
    """Load `url` (a local path or fsspec URL) into a timm backbone built with num_classes=0; strict.

    Only the file's ImageNet classifier (pretrained_cfg["classifier"]) may be left over; any other missing,
    unexpected or differently shaped tensor means another architecture: PretrainedFileError naming both.
    """
    state, recorded = read_pretrained_file(url)
    classifier = backbone.pretrained_cfg.get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
    own = backbone.state_dict()
    # BatchNorm's num_batches_tracked: older files lack it and torch fills it in on load
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        theirs = f"architecture {recorded!r}" if recorded else "an architecture the file does not name"
        details = "; ".join(part for part in (
            f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} in the file, "
            f"{tuple(own[shapes[0]].shape)} in {name})" if shapes else "") if part)
        raise PretrainedFileError(
            f"model.pretrained_file={url} holds weights of {theirs} ({_describe(state)}), not of model.name={name!r} "
            f"({_describe(own)}): {details}. Give a file saved from {name} (timm format) or set model.name to the "
            "file's architecture")
    backbone.load_state_dict(state, strict=True)


def read_pretrained_file(url: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(the backbone state dict in a weights file, the architecture name the file records or None).

    Read through fsspec (any URL) into memory: backbone files are tens to a few hundred MB.
    """
    from dermaid.files import exists, read_bytes

    if not exists(url):
        raise PretrainedFileError(f"model.pretrained_file={url}: no such file")
    data = read_bytes(url)
    try:
        if data[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
            import safetensors.torch

            blob: Any = safetensors.torch.load(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            recorded = (header.get("__metadata__") or {}).get("arch")
        else:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            recorded = blob.get("arch") if isinstance(blob, dict) and isinstance(blob.get("arch"), str) else None
    except Exception as exc:  # torch and safetensors raise many types for a damaged or foreign file
        raise PretrainedFileError(f"model.pretrained_file={url}: not a weights file ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's train.py and DermAID wrappers
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise PretrainedFileError(f"model.pretrained_file={url}: holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in blob.items()}  # saved from a DDP-wrapped model
    if any(k.startswith("backbone.") for k in state):  # a DermAID model.pt: its backbone, and its card's name
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        recorded = recorded or _card_model_name(url)
    return state, recorded


def _card_model_name(weights_url: str) -> str | None:
    """The backbone named by the card.json beside a DermAID model.pt, if there is one."""
    from dermaid.files import exists, read_text

    card = weights_url.rsplit("/", 1)[0] + "/card.json"
    try:
        return json.loads(read_text(card))["model"]["name"] if exists(card) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _describe(state: dict[str, torch.Tensor]) -> str:
    params = sum(int(v.numel()) for v in state.values())
    return f"{len(state)} tensors, {params / 1e6:.2f} M values, first {next(iter(state), '-')!r}"


def resolve_input_spec(model: LesionClassifier, img_size: int | None = None) -> dict[str, Any]:
    """The input spec (size, mean, std, interpolation, crop_pct, crop_mode) from timm's data config.

    img_size overrides timm's default resolution (the toy runs train at small sizes).
    """
    data_cfg = timm.data.resolve_model_data_config(model.backbone)
    size = tuple(data_cfg["input_size"])
    if img_size:
        size = (size[0], int(img_size), int(img_size))
    return {
        "input_size": list(size),
        "mean": [float(x) for x in data_cfg["mean"]],
        "std": [float(x) for x in data_cfg["std"]],
        "interpolation": str(data_cfg["interpolation"]),  # timm's resolved data config sets every key
        "crop_pct": float(data_cfg["crop_pct"]),
        "crop_mode": str(data_cfg["crop_mode"]),  # center | squash | border: dermaid.data.transforms
    }
