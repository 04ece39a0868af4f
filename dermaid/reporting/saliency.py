"""Saliency galleries: CAM overlays (dermaid.inference.Explainer) per image, class and method.

    explainer = Explainer(Predictor("runs/toy/best"))
    picks = pick_per_class(read_records("data/toy"), per_class=2, seed=0)
    plot_method_gallery(explainer, picks, methods=["gradcam", "eigencam"])   # rows: images, columns: methods
    plot_target_gallery(explainer, picks.iloc[:3])                           # rows: images, columns: classes

Rows are records with an image (`image` bytes, or `image_url`) and optional label/age/sex/site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from dermaid.classes import CLASS_CODES
from dermaid.data.images import resize_shorter_side
from dermaid.errors import DermaidError
from dermaid.inference import CAM_METHODS, Explainer
from dermaid.reporting.figures import image_grid
from dermaid.files import read_bytes

THUMB = 160  # pixels (shorter side) of each overlay in a gallery: detail enough, small HTML


def pick_per_class(records: pd.DataFrame, per_class: int = 2, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` seeded random rows of each class present, in class order."""
    parts = []
    for code in CLASS_CODES:
        subset = records[records["label"] == code]
        if len(subset):
            parts.append(subset.sample(min(per_class, len(subset)), random_state=seed))
    return pd.concat(parts, ignore_index=True) if parts else records.iloc[:0]


def records_from_urls(urls: Sequence[str]) -> pd.DataFrame:
    """A records table for image files given one by one (no label, no metadata)."""
    return pd.DataFrame({
        "image_id": [str(u).rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for u in urls],
        "image_url": list(urls),
        "label": [None] * len(urls),
    })


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown or not methods:
        raise DermaidError(f"methods: unknown or empty {list(methods)}; choose from {list(CAM_METHODS)}")
    return list(methods)


def image_bytes(row: Any) -> bytes:
    """The image of a record: its `image` bytes (prepared shards) or the file at `image_url`."""
    data = row.get("image") if hasattr(row, "get") else None
    return bytes(data) if data is not None else read_bytes(row["image_url"])


def explain_row(explainer: Explainer, row: Any, method: str = "gradcam", target: str | None = None):
    """One record -> dermaid.inference.Saliency (target None: the predicted class)."""
    meta = {k: _value(row.get(k)) for k in ("age", "sex", "site")}
    return explainer.explain(image_bytes(row), target=target, method=method, **meta)


def _value(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and v != v) else v


def _thumb(image: Image.Image, size: int = THUMB) -> Image.Image:
    return resize_shorter_side(image, size)


def plot_method_gallery(explainer: Explainer, rows: pd.DataFrame, methods: Sequence[str],
                        title: str = "CAM overlays per method (target: the predicted class)") -> Figure:
    """One row per image: the input, then each method's overlay for the predicted class."""
    methods = check_methods(methods)
    cells, labels, captions = [], [], []
    for _, row in rows.iterrows():
        data = image_bytes(row)
        original = explainer.predictor.prepare(data).image
        saliencies = [explain_row(explainer, row, method=m) for m in methods]
        first = saliencies[0]
        cells.append([_thumb(original)] + [_thumb(s.overlay) for s in saliencies])
        truth = row.get("label") or "?"
        labels.append(f"{row['image_id']}\ntrue {truth}")
        captions.append([f"pred {first.target} {first.probability:.2f}"] + [""] * len(methods))
    return image_grid(cells, row_labels=labels, col_labels=["input", *methods], captions=captions, title=title)


def plot_target_gallery(explainer: Explainer, rows: pd.DataFrame, method: str = "gradcam",
                        classes: Sequence[str] = CLASS_CODES) -> Figure:
    """One row per image: overlays for each target class (what evidence the model sees for each)."""
    check_methods([method])
    cells, labels, captions = [], [], []
    for _, row in rows.iterrows():
        saliencies = [explain_row(explainer, row, method=method, target=code) for code in classes]
        cells.append([_thumb(s.overlay) for s in saliencies])
        labels.append(f"{row['image_id']}\ntrue {row.get('label') or '?'}")
        captions.append([f"p={s.probability:.2f}" for s in saliencies])
    return image_grid(cells, row_labels=labels, col_labels=list(classes), captions=captions,
                      title=f"{method} overlays per target class")
