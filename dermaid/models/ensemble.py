"""Ensembles as one model: a checkpoint directory whose card names its members; its probabilities are the mean of
the members' calibrated probabilities.

    dermaid ensemble members=[runs/cv/fold-0/best,runs/cv/fold-1/best] out=runs/ens
    dermaid cv experiment=toy                     # builds DIR/ensemble from the fold models (dermaid.training.cv)

    card = build_ensemble(["runs/a/best", "runs/b/best"], "runs/ens")
    Predictor("runs/ens")                         # like any checkpoint: evaluate, serve and Grad-CAM take it too

Layout: DIR/card.json (kind "ensemble", artifact "members", and an `ensemble` block naming every member: its path
inside DIR, where it came from, its model version and temperature), DIR/members/00/, DIR/members/01/, ... (each
member's checkpoint copied in, any artifact kind: the ensemble is self-contained, so a registry or a Serve replica
on another node reads one directory).

The model callable (EnsembleModel, loaded through dermaid.inference.loaders like every kind) runs every member on
the same batch (one deployment serves them all, batched together) and returns log(mean_i softmax(logits_i / T_i)):
the ensemble's own temperature is 1, so the softmax every consumer applies (Predictor, evaluate) gives back exactly
the mean of the members' calibrated probabilities. Members therefore share one input: their class tables, input
specs and preparation blocks must be equal; a difference is refused with what differs named. Grad-CAM averages the
members' maps (dermaid.inference.saliency). `dermaid calibrate checkpoint=DIR` gives the ensemble its own OOD
detector (msp / energy on its combined logits) and triage cut-off in DIR/card.json; the members need none.
Decision support for research, never a diagnosis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, atomic_dir, exists, get_fs, join, read_bytes, write_bytes, write_text
from dermaid.models.card import (CARD_FILE, CheckpointError, ModelCard, code_version, load_card, metadata_vocabulary,
                                 model_version)

ENSEMBLE_KIND = "ensemble"
MEMBERS_DIR = "members"
COMBINE_RULE = "mean of the members' calibrated probabilities (softmax(logits_i / T_i))"
_MIN_PROBABILITY = float(torch.finfo(torch.float32).tiny)  # log(0) would be -inf: a finite floor, ~1e-38


def run(cfg: DictConfig) -> ModelCard:
    """`dermaid ensemble members=[URL,URL,...] out=DIR`: build the ensemble checkpoint and say what it holds."""
    plain = to_plain(cfg)
    members = plain["members"]
    if isinstance(members, str):  # `members=URL`: one string, not a list of characters
        members = [members]
    card = build_ensemble(list(members), str(plain["out"]), overwrite=bool(plain["overwrite"]))
    out = absolute_url(str(plain["out"]))
    print(f"ensemble of {len(card.ensemble['members'])} members -> {out}")
    for member in card.ensemble["members"]:
        print(f"  {member['path']}: {member['model']} (T={member['temperature']:.3f}) from {member['source']}")
    print(DISCLAIMER)
    return card


# ---------------------------------------------------------------------------------------------
# Building


def build_ensemble(members: Sequence[str], out: str, metrics: dict[str, Any] | None = None,
                   overwrite: bool = False) -> ModelCard:
    """Copy the member checkpoints into out/members/NN/ and write the ensemble's card (atomically); returns it.

    CheckpointError when fewer than two members, a member is missing or unreadable, is itself an ensemble, or the
    members differ in class table, input spec or preparation (the difference named)."""
    urls = [absolute_url(str(m)) for m in members]
    if len(urls) < 2:
        raise CheckpointError(f"members: an ensemble needs at least two checkpoints, got {len(urls)}")
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise CheckpointError(f"members: {repeated[0]} is listed more than once")
    out = absolute_url(str(out))
    if exists(join(out, CARD_FILE)) and not overwrite:
        raise DermaidError(f"out={out} holds a checkpoint already: choose another out= (or overwrite=true)")
    cards = [_member_card(url) for url in urls]
    check_members(list(zip(urls, cards)))
    first = cards[0]
    uses_metadata = any(card.uses_metadata for card in cards)
    versions = list(dict.fromkeys(v for card in cards for v in card.trained_on))
    entries = [_member_entry(i, url, card) for i, (url, card) in enumerate(zip(urls, cards))]
    card = ModelCard(
        kind=ENSEMBLE_KIND,
        artifact=MEMBERS_DIR,
        model={"name": ENSEMBLE_KIND, "members": [card.model_name for card in cards], "use_metadata": uses_metadata},
        classes=[dict(c) for c in first.classes],
        input=dict(first.input),
        metadata=metadata_vocabulary(uses_metadata),
        dataset_version=first.dataset_version if len({c.dataset_version for c in cards}) == 1 else None,
        dataset_versions=versions,
        code_version=code_version(),
        metrics=dict(metrics or {}),
        calibration={"temperature": 1.0, "members": [card.temperature for card in cards]},
        created=_utc_now(),
        preparation=dict(first.preparation) if first.preparation else None,
        ensemble={"combine": COMBINE_RULE, "members": entries},
    )
    with atomic_dir(out) as tmp:
        for entry, url in zip(entries, urls):
            _copy_tree(url, join(tmp, entry["path"]))
        write_text(join(tmp, CARD_FILE), json.dumps(card.to_dict(), indent=2, default=str))
    return card


def check_members(members: Sequence[tuple[str, ModelCard]]) -> None:
    """Refuse members that cannot share one input and one output: class table, input spec, preparation."""
    first_url, first = members[0]
    for url, card in members[1:]:
        for what, mine, theirs in (("class tables", first.classes, card.classes),
                                   ("input specs", first.input, card.input),
                                   ("preparation", first.preparation, card.preparation)):
            if mine != theirs:
                raise CheckpointError(f"members differ in their {what}: {_difference(mine, theirs)} "
                                      f"({first_url} vs {url}); an ensemble's members share one input and one "
                                      "class table")


def _member_card(url: str) -> ModelCard:
    """A member's card; its class table is compared as written (load_card refuses foreign ones by itself)."""
    raw_url = join(url, CARD_FILE)
    if not exists(raw_url):
        raise CheckpointError(f"{url}: not a DermAID checkpoint (no {CARD_FILE})")
    try:
        card = load_card(url)
    except CheckpointError as exc:
        raise CheckpointError(f"ensemble member {exc}") from None
    if card.kind == ENSEMBLE_KIND:
        raise CheckpointError(f"{url}: an ensemble itself; list its members instead")
    if not exists(join(url, card.artifact)):
        raise CheckpointError(f"{url}: weights file {card.artifact} is missing")
    return card


def _member_entry(index: int, url: str, card: ModelCard) -> dict[str, Any]:
    return {
        "path": f"{MEMBERS_DIR}/{index:02d}",
        "source": url,
        "model_version": model_version(card),
        "model": card.model_name,
        "kind": card.kind,
        "temperature": card.temperature,
        "uses_metadata": card.uses_metadata,
        "dataset_version": card.dataset_version,
        "fold": (card.config.get("data") or {}).get("fold"),
        "epoch": card.epoch,
    }


def _difference(mine: Any, theirs: Any) -> str:
    """The first difference, readable: a class position, or the keys whose values differ."""
    if isinstance(mine, list) and isinstance(theirs, list):
        if len(mine) != len(theirs):
            return f"{len(mine)} vs {len(theirs)} classes"
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                return f"class {i}: " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
    if isinstance(mine, dict) and isinstance(theirs, dict):
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return ", ".join(f"{k} {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys)
    return f"{mine!r} vs {theirs!r}"


def _copy_tree(src: str, dst: str) -> None:
    """Every file under the checkpoint directory src, copied to dst (any fsspec URLs, across filesystems)."""
    fs, root = get_fs(src)
    root = root.rstrip("/")
    for path in sorted(fs.find(root)):
        write_bytes(join(dst, path[len(root):].lstrip("/")), read_bytes(fs.unstrip_protocol(path)))


def _utc_now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Loading


def member_urls(url: str, card: ModelCard) -> list[str]:
    """The member checkpoint URLs inside the ensemble directory at `url`, in the card's order."""
    if card.kind != ENSEMBLE_KIND or not card.ensemble:
        raise CheckpointError(f"{url}: not an ensemble checkpoint (kind {card.kind!r})")
    urls = [join(url, str(member["path"])) for member in card.ensemble["members"]]
    for member_url in urls:
        if not exists(join(member_url, CARD_FILE)):
            raise CheckpointError(f"{url}: ensemble member {member_url} is missing")
    return urls


class EnsembleModel(nn.Module):
    """The members as one model callable: images (B, 3, H, W), metadata (B, 14) | None ->
    log(mean_i softmax(logits_i / T_i)) (B, K), whose softmax is the mean calibrated probability."""

    def __init__(self, members: Sequence[Any], temperatures: Sequence[float], uses_metadata: Sequence[bool]) -> None:
        super().__init__()
        # torch members in a ModuleList (so .eval() and .to() reach them); compressed ones (ONNX sessions) beside it
        self.torch_members = nn.ModuleList([m for m in members if isinstance(m, nn.Module)])
        self._members = list(members)
        self.temperatures = [float(t) for t in temperatures]
        self.uses_metadata = [bool(u) for u in uses_metadata]

    def member_probabilities(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Each member's calibrated probabilities (M, B, K), float64."""
        rows = []
        for member, temperature, uses in zip(self._members, self.temperatures, self.uses_metadata):
            logits = member(images, metadata if uses else None)  # (B, K)
            rows.append(torch.softmax(logits.double() / temperature, dim=-1))
        return torch.stack(rows)  # (M, B, K)

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        probs = self.member_probabilities(images, metadata).mean(dim=0)  # (B, K)
        return torch.log(probs.clamp_min(_MIN_PROBABILITY)).float()  # (B, K)


def load_ensemble(url: str, card: ModelCard, device: torch.device) -> EnsembleModel:
    """The ensemble checkpoint at `url` as one model callable; each member through its own kind's loader."""
    from dermaid.inference.loaders import create_model_fn

    members, temperatures, uses = [], [], []
    for member_url in member_urls(url, card):
        member_card = load_card(member_url)
        members.append(create_model_fn(member_url, member_card, device))
        temperatures.append(member_card.temperature)
        uses.append(member_card.uses_metadata)
    return EnsembleModel(members, temperatures, uses).eval()


def float_members(url: str, card: ModelCard, device: str | torch.device = "cpu") -> list[tuple[nn.Module, ModelCard]]:
    """(float module in eval mode, member card) per member, for Grad-CAM: a compressed member's float source."""
    from dermaid.models.card import float_weights_for, load_float_model

    found = []
    for member_url in member_urls(url, card):
        model, _ = load_float_model(float_weights_for(member_url), device)
        found.append((model, load_card(member_url)))
    return found
