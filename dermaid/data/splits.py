"""Lesion-grouped, class-stratified folds plus a held-out test part, deterministic for a seed.

    from dermaid.data.splits import assign_folds
    records["fold"] = assign_folds(records, folds=5, test_fraction=0.15, seed=0)   # -1 = test

Every image of a lesion lands in the same part (an image without a lesion id is its own group),
so no lesion is in two folds or in both a fold and the test part. The test part is chosen
first and does not depend on the number of folds. Groups are placed greedily, largest first
(ties in a seeded random order), each into the part whose classes are least filled relative
to their targets; per-class shares stay within about one group of the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dermaid.errors import DermaidError

TEST_FOLD = -1
_UNLABELED = "__unlabeled__"


def lesion_groups(records: pd.DataFrame) -> np.ndarray:
    """Group key per row: the lesion id, else the row's own image id. (N,)"""
    lesion = records["lesion_id"].tolist() if "lesion_id" in records else [None] * len(records)
    return np.asarray([
        f"lesion:{l}" if isinstance(l, str) and l else f"image:{i}"
        for l, i in zip(lesion, records["image_id"].tolist())
    ], dtype=object)


def assign_folds(records: pd.DataFrame, folds: int = 5, test_fraction: float = 0.15, seed: int = 0) -> np.ndarray:
    """Fold per row (int32, 0..folds-1; -1 = held-out test), aligned with `records`."""
    if folds < 2:
        raise DermaidError(f"data.folds must be at least 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise DermaidError(f"data.test_fraction must be in [0, 1), got {test_fraction}")
    n = len(records)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    labels = np.asarray([l if isinstance(l, str) and l else _UNLABELED for l in records["label"].tolist()])
    groups = lesion_groups(records)
    classes, label_idx = np.unique(labels, return_inverse=True)
    group_keys, group_idx = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(group_keys), len(classes)), dtype=np.int64)  # (G, C)
    np.add.at(counts, (group_idx, label_idx), 1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(group_keys))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]  # largest groups first

    part_of_group = np.full(len(group_keys), 0, dtype=np.int32)
    rest = order
    if test_fraction > 0:
        in_test = _greedy(counts, order, np.asarray([test_fraction, 1.0 - test_fraction]))
        part_of_group[order[in_test == 0]] = TEST_FOLD
        rest = order[in_test == 1]
    fold_of_rest = _greedy(counts, rest, np.full(folds, 1.0 / folds))
    part_of_group[rest] = fold_of_rest
    return part_of_group[group_idx].astype(np.int32)


def _greedy(counts: np.ndarray, order: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Place groups (rows of counts, in `order`) into len(weights) parts; returns a part per ordered group."""
    totals = counts[order].sum(axis=0).astype(float)  # (C,)
    targets = np.maximum(weights[:, None] * totals[None, :], 1e-9)  # (P, C)
    filled = np.zeros_like(targets)
    size_targets = weights * totals.sum()
    sizes = np.zeros(len(weights))
    out = np.empty(len(order), dtype=np.int32)
    for k, g in enumerate(order):
        c = counts[g].astype(float)  # (C,)
        # fill ratio of the group's classes after placing it, then overall fill as a tie-break
        cost = ((filled + c) / targets * c).sum(axis=1) / c.sum() + 1e-3 * (sizes + c.sum()) / size_targets
        part = int(np.argmin(cost))
        filled[part] += c
        sizes[part] += c.sum()
        out[k] = part
    return out


def split_counts(labels: Sequence, folds: Sequence[int]) -> dict[str, dict]:
    """The manifest's `counts`: per class, per fold, and class by fold (fold keys as strings)."""
    frame = pd.DataFrame({"label": [l if isinstance(l, str) and l else "unlabeled" for l in labels],
                          "fold": [int(f) for f in folds]})
    by_class = frame["label"].value_counts().sort_index()
    by_fold = frame["fold"].value_counts().sort_index()
    class_by_fold = {
        str(f): {str(k): int(v) for k, v in sub["label"].value_counts().sort_index().items()}
        for f, sub in frame.groupby("fold", sort=True)
    }
    return {
        "class": {str(k): int(v) for k, v in by_class.items()},
        "fold": {str(k): int(v) for k, v in by_fold.items()},
        "class_by_fold": class_by_fold,
    }
