"""What is monitored about one prediction: image statistics, prediction features, the prediction log's row.

    stats = image_statistics(prepared.model_input)     # brightness / saturation / hue mean and spread, sharpness
    row = prediction_row(probabilities=..., ood_score=..., abstain=..., triage="low", width=..., height=...,
                         image_format="JPEG", stats=stats, age=55, sex="male", site="head/neck", ...)

A row holds no image and nothing that identifies a person: the time, the model version, the answer
(probabilities, top class, malignancy score, entropy, OOD score, abstain, triage), the image's size, format
and a few statistics of the pixels the model saw, and the metadata as given with the age coarsened to a
5-year band (ISIC's own age_approx granularity). No client address, no upload id, no image digest.

FEATURES names every logged feature the drift report compares with the reference profile, and how
(numeric: two-sample Kolmogorov-Smirnov; categorical: chi-square on the category counts; dermaid.monitoring.drift).
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dermaid.classes import CLASS_CODES

AGE_BAND_YEARS = 5   # ISIC 2019's age_approx granularity: coarse enough not to single out a person
STATS_SIDE = 112     # statistics on the model input reduced to at most this side (a 224 crop halved): ~12k pixels
MISSING = "(none)"   # a categorical value not given (sex, site) or not available (abstained triage)
PROBABILITY_COLUMNS = tuple(f"p_{code}" for code in CLASS_CODES)


@dataclass(frozen=True)
class Feature:
    """One monitored column: numeric (KS test) or categorical (chi-square), and what it measures."""

    name: str
    kind: str          # "numeric" | "categorical"
    description: str


FEATURES: tuple[Feature, ...] = (
    Feature("brightness_mean", "numeric", "mean of HSV value (0-1) of the pixels the model saw"),
    Feature("brightness_std", "numeric", "spread (std) of HSV value"),
    Feature("saturation_mean", "numeric", "mean HSV saturation (0-1)"),
    Feature("saturation_std", "numeric", "spread of HSV saturation"),
    Feature("hue_mean", "numeric", "circular mean hue in degrees (-180, 180], weighted by saturation"),
    Feature("hue_std", "numeric", "circular spread of hue in degrees"),
    Feature("sharpness", "numeric", "variance of the Laplacian of the HSV value (blur lowers it)"),
    Feature("width", "numeric", "width of the upright upload in pixels"),
    Feature("height", "numeric", "height of the upright upload in pixels"),
    Feature("malignancy_score", "numeric", "sum of the malignant classes' probabilities"),
    Feature("entropy", "numeric", "entropy of the class probabilities / ln(8)"),
    Feature("ood_score", "numeric", "the card's out-of-distribution score"),
    Feature("age", "numeric", "age band given (5 years)"),
    Feature("top_class", "categorical", "the class with the highest probability"),
    Feature("abstain", "categorical", "whether the model refused the photo"),
    Feature("image_format", "categorical", "JPEG, PNG, WEBP, ..."),
    Feature("sex", "categorical", "sex given"),
    Feature("site", "categorical", "anatomical site given"),
)
FEATURE_NAMES = tuple(feature.name for feature in FEATURES)
# What a person gave, not what the model made of the image: its reference is every labelled image of the dataset
# version (dermaid.monitoring.reference), not only the validation fold
METADATA_FEATURES = ("age", "sex", "site")


def image_statistics(image: Image.Image) -> dict[str, float]:
    """Brightness, saturation and hue (mean and spread) and sharpness of an RGB image: the model input crop.

    All on the crop reduced to at most STATS_SIDE px (PIL's box reduction: means and spreads barely move, and an
    upload blurred or upsampled from a few pixels stays blurred), in PIL's HSV; sharpness is the variance of the
    Laplacian of the HSV value. ~1 ms per 224 px crop on one core."""
    factor = -(-max(image.size) // STATS_SIDE)  # ceil: the reduced side is at most STATS_SIDE
    small = image.reduce(factor) if factor > 1 else image
    hsv = np.asarray(small.convert("HSV"))  # (h, w, 3) uint8
    hue = hsv[..., 0].astype(np.float32) * (2.0 * math.pi / 256.0)
    sat = hsv[..., 1].astype(np.float32) / 255.0
    val = hsv[..., 2].astype(np.float32)
    weight = sat + 1e-6  # grey pixels have no hue: weight by saturation
    total = float(weight.sum())
    c, s = float((weight * np.cos(hue)).sum()) / total, float((weight * np.sin(hue)).sum()) / total
    resultant = min(1.0, math.hypot(c, s))
    laplacian = val[1:-1, :-2] + val[1:-1, 2:] + val[:-2, 1:-1] + val[2:, 1:-1] - 4.0 * val[1:-1, 1:-1]
    return {
        "brightness_mean": float(val.mean()) / 255.0, "brightness_std": float(val.std()) / 255.0,
        "saturation_mean": float(sat.mean()), "saturation_std": float(sat.std()),
        "hue_mean": math.degrees(math.atan2(s, c)),
        "hue_std": math.degrees(math.sqrt(-2.0 * math.log(max(resultant, 1e-12)))),
        "sharpness": float(laplacian.var()) if laplacian.size else 0.0,
    }


def image_format(data: bytes) -> str | None:
    """The upload's format from its header (PIL reads no pixels here); None when unreadable."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # noqa: BLE001 - only a label for monitoring; decoding reports the real error
        return None


def age_band(age: Any) -> float | None:
    """Age coarsened to AGE_BAND_YEARS (None stays None)."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    return float(round(float(age) / AGE_BAND_YEARS) * AGE_BAND_YEARS)


def normalised_entropy(probabilities: Sequence[float]) -> float:
    """Entropy of the probabilities / ln(K): 0 certain, 1 uniform (dermaid.uploads.store.entropy, in nats)."""
    from dermaid.uploads.store import entropy

    return entropy(probabilities) / math.log(len(probabilities))


def prediction_row(*, probabilities: Sequence[float], ood_score: float | None, abstain: bool | None,
                   malignancy_score: float | None, triage: str | None, model_version: str, route: str,
                   width: int | None, height: int | None, image_format: str | None, stats: dict[str, float] | None,
                   age: Any, sex: str | None, site: str | None, consent: bool,
                   latency_ms: dict[str, float] | None = None, time: _dt.datetime | None = None) -> dict[str, Any]:
    """One prediction log row (see the module docstring for what it holds and leaves out)."""
    probs = [float(p) for p in probabilities]
    top = CLASS_CODES[int(np.argmax(probs))] if probs else None
    latency = latency_ms or {}
    row: dict[str, Any] = {
        "time": time or _dt.datetime.now(_dt.timezone.utc),
        "model_version": str(model_version), "route": route,
        **{column: p for column, p in zip(PROBABILITY_COLUMNS, probs)},
        "top_class": top, "malignancy_score": None if malignancy_score is None else float(malignancy_score),
        "entropy": normalised_entropy(probs) if probs else None,
        "ood_score": None if ood_score is None else float(ood_score),
        "abstain": None if abstain is None else bool(abstain),
        "triage": triage,
        "width": None if width is None else int(width), "height": None if height is None else int(height),
        "image_format": image_format,
        "age": age_band(age), "sex": sex, "site": site, "consent": bool(consent),
        "latency_ms": latency.get("request"), "decode_ms": latency.get("decode"),
        "forward_ms": latency.get("forward"),
    }
    row.update({key: (stats or {}).get(key) for key in STAT_COLUMNS})
    return row


STAT_COLUMNS = ("brightness_mean", "brightness_std", "saturation_mean", "saturation_std", "hue_mean", "hue_std",
                "sharpness")


def describe_image(data: bytes, model_input: Image.Image) -> dict[str, Any]:
    """{"image_format", "stats"} of one decoded upload, for the Classifier's answer; never raises (a failure
    leaves them empty: monitoring must not fail a request)."""
    try:
        return {"image_format": image_format(data), "stats": image_statistics(model_input)}
    except Exception:  # noqa: BLE001 - see the docstring
        return {"image_format": None, "stats": None}
