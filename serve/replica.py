"""What every model replica (Classifier, Explainer) does once its model has loaded."""

from __future__ import annotations

import gc


def freeze_gc() -> None:
    """After loading a model: its many long-lived objects leave the collector's scans, so no request pays
    for a full collection walking them."""
    gc.collect()
    gc.freeze()
