"""What notebooks/00-quickstart.ipynb imports besides dermaid.api: one image and its Grad-CAM, a call to the
HTTP API of a running `dermaid serve` (a note instead when none answers).

    row = sample_image(version_url, fold=0, code="MEL")           # one validation record (image bytes + metadata)
    plot_saliency(explainer, row)                                 # the input beside its Grad-CAM overlay
    answer, note = ask_service("http://127.0.0.1:8000", row)      # /v1/classify's JSON, or None and why

Decision support for research, never a diagnosis.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from dermaid.reporting.figures import image_grid
from dermaid.reporting.saliency import _thumb, explain_row, image_bytes

SERVICE_TIMEOUT_S = 5.0  # a local service answers a toy image in well under a second; a missing one fails at once


def sample_image(version_url: str, fold: int = 0, code: str | None = None, split: str = "val") -> pd.Series:
    """The first record (by image id) of `split` labelled `code` (None: of any label)."""
    from dermaid.data.loading import load_records

    records = load_records(version_url, split=split, fold=fold)
    chosen = records[records["label"] == code] if code else records
    return (chosen if len(chosen) else records).iloc[0]


def plot_saliency(explainer: Any, row: pd.Series, method: str = "gradcam") -> Figure:
    """The input and the CAM overlay for the predicted class (caption: the class and its probability)."""
    saliency = explain_row(explainer, row, method=method)
    original = explainer.predictor.prepare(image_bytes(row)).image
    return image_grid([[_thumb(original, 224), _thumb(saliency.overlay, 224)]],
                      row_labels=[f"{row['image_id']}\ntrue {row.get('label') or '?'}"],
                      col_labels=["input", f"{method}: predicted class"],
                      captions=[["", f"{saliency.target} p={saliency.probability:.2f}"]], cell=3.0)


def ask_service(url: str, row: pd.Series, timeout: float = SERVICE_TIMEOUT_S) -> tuple[dict[str, Any] | None, str]:
    """POST the record's image and metadata to `url`/v1/classify: (the JSON answer, "") when a service answers,
    else (None, a note saying how to start one)."""
    import requests

    url = url.rstrip("/")
    try:
        ready = requests.get(f"{url}/readyz", timeout=timeout)
    except requests.RequestException as exc:
        return None, (f"No `dermaid serve` answers at {url} ({type(exc).__name__}): start one in a terminal with "
                      "`dermaid serve checkpoint=<the run's best/>` and run this cell again.")
    if ready.status_code != 200:
        return None, f"The service at {url} is not ready yet ({ready.status_code} on /readyz): try again shortly."
    form = {key: str(row[key]) for key in ("age", "sex", "site") if key in row and pd.notna(row[key])}
    if "age" in form:
        form["age"] = str(int(float(form["age"])))
    answer = requests.post(f"{url}/v1/classify", files={"image": ("image.jpg", image_bytes(row), "image/jpeg")},
                           data=form, timeout=timeout)
    if answer.status_code != 200:
        return None, f"The service at {url} answered {answer.status_code}: {answer.text[:300]}"
    return answer.json(), ""
