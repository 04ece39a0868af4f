"""What a model card must hold before a stage may point at it (`Registry.promote` runs these).

    problems = check_card(load_card(url), url)   # [] when promotable, else one readable reason per problem

A served model must say what it outputs (the class table, dermaid.classes), what it reads (the input spec the
Predictor repeats), and when to refuse and when to send someone to a doctor: the `ood` and `triage` blocks that
`dermaid calibrate` writes (dermaid.evaluation.calibrate), with its statistics file when the method has one.
"""

from __future__ import annotations

import math
from typing import Any

from dermaid.classes import class_table
from dermaid.files import exists, join
from dermaid.models.card import ModelCard


def check_card(card: ModelCard, checkpoint_url: str) -> list[str]:
    """Every reason the checkpoint at `checkpoint_url` (with `card`) may not be promoted; [] when it may."""
    return [*_check_classes(card), *_check_input(card), *_check_calibration(card, checkpoint_url),
            *_check_artifact(card, checkpoint_url)]


def _check_classes(card: ModelCard) -> list[str]:
    expected = [(c["code"], c["name"]) for c in class_table()]
    found = [(c.get("code"), c.get("name")) for c in card.classes]
    if found != expected:
        return [f"class table {found} differs from dermaid.classes {expected}"]
    return []


def _check_input(card: ModelCard) -> list[str]:
    spec = card.input
    problems = []
    size = spec.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_positive_int(v) for v in size)):
        problems.append(f"input spec: input_size {size!r} is not (C, H, W) of positive integers")
    elif int(size[0]) != 3:
        problems.append(f"input spec: {size[0]} input channels (RGB photos need 3)")
    for key in ("mean", "std"):
        value = spec.get(key)
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_finite(v) for v in value)):
            problems.append(f"input spec: {key} {value!r} is not three numbers")
        elif key == "std" and any(float(v) <= 0 for v in value):
            problems.append(f"input spec: std {value!r} has a value <= 0")
    return problems


def _check_calibration(card: ModelCard, url: str) -> list[str]:
    problems = []
    temperature = card.calibration.get("temperature")
    if not (_finite(temperature) and float(temperature) > 0):
        problems.append(f"calibration: temperature {temperature!r} is not a positive number")
    ood: dict[str, Any] | None = card.ood
    if not ood:
        problems.append("no OOD block (the card cannot abstain on non-lesion photos): run `dermaid calibrate "
                        f"checkpoint={url}` first")
    else:
        for key in ("method", "threshold", "scale"):
            if ood.get(key) is None:
                problems.append(f"OOD block without {key!r}: rerun `dermaid calibrate`")
        if ood.get("threshold") is not None and not _finite(ood["threshold"]):
            problems.append(f"OOD threshold {ood['threshold']!r} is not a finite number")
        statistics = ood.get("statistics")
        if not statistics:
            problems.append("OOD block names no statistics file: rerun `dermaid calibrate`")
        elif not exists(join(url, str(statistics))):
            problems.append(f"OOD statistics file {statistics} named by the card is missing")
    if not card.triage or not _finite(card.triage.get("cutoff")):
        problems.append("no triage block with a cut-off: run `dermaid calibrate` first")
    return problems


def _check_artifact(card: ModelCard, url: str) -> list[str]:
    if not card.artifact or not exists(join(url, card.artifact)):
        return [f"artifact file {card.artifact!r} is missing"]
    return []


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
