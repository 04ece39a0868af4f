"""Lesion-grouped, stratified folds with a held-out test part."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermaid.data.splits import assign_folds, split_counts
from dermaid.errors import DermaidError


def _records(n_lesions: int = 400, seed: int = 0) -> pd.DataFrame:
    """Lesions of 1-4 images, imbalanced classes, ~10% images without a lesion id."""
    rng = np.random.default_rng(seed)
    classes = ["NV"] * 50 + ["MEL"] * 18 + ["BCC"] * 13 + ["BKL"] * 10 + ["AK", "DF", "VASC", "SCC"] * 3
    rows = []
    for lesion in range(n_lesions):
        label = classes[rng.integers(len(classes))]
        k = int(rng.integers(1, 5))
        lesion_id = None if (k == 1 and rng.random() < 0.3) else f"IL_{lesion:05d}"
        rows += [{"image_id": f"ISIC_{len(rows) + j:07d}", "label": label, "lesion_id": lesion_id} for j in range(k)]
    return pd.DataFrame(rows)


def test_no_lesion_in_two_parts_and_stratified():
    records = _records()
    folds = assign_folds(records, folds=5, test_fraction=0.15, seed=0)
    assert folds.dtype == np.int32 and len(folds) == len(records)
    assert set(folds) == {-1, 0, 1, 2, 3, 4}
    records["fold"] = folds
    assert (records.dropna(subset=["lesion_id"]).groupby("lesion_id")["fold"].nunique() == 1).all()

    n = len(records)
    assert abs((folds == -1).sum() / n - 0.15) < 0.02
    for label, group in records.groupby("label"):
        total = len(group)
        test_share = (group["fold"] == -1).mean()
        assert abs(test_share - 0.15) <= max(0.05, 4.0 / total), (label, test_share)
        per_fold = group.loc[group["fold"] >= 0, "fold"].value_counts().reindex(range(5), fill_value=0)
        expected = (group["fold"] >= 0).sum() / 5
        assert (per_fold - expected).abs().max() <= max(0.15 * expected, 4), (label, per_fold.tolist())


def test_deterministic_for_a_seed_and_test_part_independent_of_k():
    records = _records()
    a = assign_folds(records, folds=5, seed=3)
    assert np.array_equal(a, assign_folds(records, folds=5, seed=3))
    assert not np.array_equal(a, assign_folds(records, folds=5, seed=4))
    b = assign_folds(records, folds=3, seed=3)
    assert np.array_equal(a == -1, b == -1)
    assert set(b) == {-1, 0, 1, 2}


def test_images_without_lesion_are_their_own_group():
    records = pd.DataFrame({"image_id": [f"i{k}" for k in range(40)], "label": ["NV"] * 40, "lesion_id": [None] * 40})
    folds = assign_folds(records, folds=4, test_fraction=0.0, seed=0)
    assert np.bincount(folds).tolist() == [10, 10, 10, 10]  # 40 singleton groups spread evenly
    records["lesion_id"] = "IL_1"  # one lesion: everything in one part
    assert len(set(assign_folds(records, folds=4, test_fraction=0.2, seed=0))) == 1


def test_unlabeled_rows_and_bad_settings():
    records = _records(60)
    records.loc[::7, "label"] = None
    folds = assign_folds(records, folds=3, seed=0)
    counts = split_counts(records["label"].tolist(), folds)
    assert counts["class"]["unlabeled"] == records["label"].isna().sum()
    assert sum(counts["fold"].values()) == len(records)
    assert sum(sum(c.values()) for c in counts["class_by_fold"].values()) == len(records)
    with pytest.raises(DermaidError, match="folds"):
        assign_folds(records, folds=1)
    with pytest.raises(DermaidError, match="test_fraction"):
        assign_folds(records, test_fraction=1.5)
