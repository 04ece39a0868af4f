"""Drift of every logged feature between the reference profile and a window of the prediction log.

    table = drift_table(reference, window)          # one row per feature: statistic, p-value, threshold, alert
    alerts = alert_list(table)                      # [{feature, statistic, value, p_value, threshold, ...}]

Tests (scipy.stats, not evidently): numeric features get the two-sample Kolmogorov-Smirnov test
(`ks_2samp`), categorical ones a chi-square test of the reference and window category counts
(`chi2_contingency`). Why scipy: these are the same tests evidently 0.7 runs per column by default, but
evidently would bring its report engine, plotly and a large dependency tree into the service image for four
function calls, and its per-column p < 0.05 has no correction for testing ~18 features per window; here the
thresholds are stated and the correction is ours.

Alert rule (both must hold), the thresholds are function arguments with these defaults:
- p < alpha / m, Bonferroni over the m features tested in the window, alpha = 0.01: the chance that an
  unshifted window raises any alert is at most 1%, so 20 unshifted windows raise an alert with probability
  <= 1 - 0.99^20 ~ 18% and 0.2 alerts expected (docs/benchmarks.md has the measured rate);
- an effect at least MIN_EFFECT: the KS statistic D (the largest gap between the two cumulative
  distributions) >= 0.1, or Cramer's V >= 0.1 for a categorical feature, so that a very large window does
  not alert on a difference too small to matter.
A feature with fewer than MIN_SAMPLES values on either side is reported as not tested, with the reason.
Age, sex and site are compared with every reference row, the other features with the validation rows only
(dermaid.monitoring.reference: the metadata-only rows of the other folds).
Categories expected fewer than 5 times (chi-square's usual validity rule) are pooled into one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dermaid.monitoring.features import FEATURES, METADATA_FEATURES, MISSING, Feature

METADATA_ROUTE = "reference-metadata"  # dermaid.monitoring.reference's metadata-only rows (age, sex, site)

DEFAULT_ALPHA = 0.01         # family-wise false-alarm probability per window (Bonferroni over its features)
MIN_EFFECT = 0.1             # KS D / Cramer's V below this never alerts: too small to matter
MIN_SAMPLES = 10             # fewer values on either side: not tested (no test has power there)
MIN_EXPECTED = 5.0           # chi-square: categories expected fewer times are pooled
# Photos of one lesion share its metadata (sex, site), so those counts are clustered, not independent draws: their
# chi-square is divided by this design effect (Rao-Scott's first-order correction). E[k^2] / E[k] for k photos per
# lesion: ~2.2 for the toy generator's geometric 1.6 photos per lesion, ~1.5-2 in ISIC 2019. Without it, site alerted
# on 6 of 20 unshifted simulated windows (docs/benchmarks.md).
METADATA_DESIGN_EFFECT = 2.0
POOLED = "(other)"

COLUMNS = ("feature", "kind", "statistic", "value", "p_value", "threshold", "effect", "min_effect",
           "n_reference", "n_window", "alert", "note")


def drift_table(reference: pd.DataFrame, window: pd.DataFrame, features: Sequence[Feature] = FEATURES,
                alpha: float = DEFAULT_ALPHA, min_effect: float = MIN_EFFECT,
                min_samples: int = MIN_SAMPLES) -> pd.DataFrame:
    """One row per feature (COLUMNS). threshold is the Bonferroni p-value cut alpha / m, m = features tested."""
    rows = []
    validation = reference
    if "route" in reference.columns:  # a profile from dermaid.monitoring.reference: metadata-only rows aside
        validation = reference[reference["route"] != METADATA_ROUTE]
    for feature in features:
        ref = reference if feature.name in METADATA_FEATURES else validation
        if feature.name not in reference.columns or feature.name not in window.columns:
            rows.append(_untested(feature, 0, 0, "not in the reference profile" if feature.name not in
                                  reference.columns else "not in the log"))
            continue
        if feature.kind == "numeric":
            rows.append(_numeric_test(feature, ref[feature.name], window[feature.name], min_samples))
        else:
            deff = METADATA_DESIGN_EFFECT if feature.name in METADATA_FEATURES else 1.0
            rows.append(_categorical_test(feature, ref[feature.name], window[feature.name], min_samples, deff))
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("threshold", "min_effect", "alert")])
    tested = table["p_value"].notna()
    m = int(tested.sum())
    table["threshold"] = alpha / m if m else np.nan
    table["min_effect"] = min_effect
    table["alert"] = tested & (table["p_value"] < table["threshold"]) & (table["effect"] >= min_effect)
    return table[list(COLUMNS)]


def alert_list(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The alerting rows as plain dicts: feature, statistic, value, p_value, threshold, effect, min_effect."""
    keys = ("feature", "statistic", "value", "p_value", "threshold", "effect", "min_effect")
    return [{key: (row[key] if isinstance(row[key], str) else float(row[key])) for key in keys}
            for _, row in table[table["alert"]].iterrows()]


def _numeric_test(feature: Feature, reference: pd.Series, window: pd.Series, min_samples: int) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    ref = pd.to_numeric(reference, errors="coerce").dropna().to_numpy(dtype=float)
    win = pd.to_numeric(window, errors="coerce").dropna().to_numpy(dtype=float)
    if min(len(ref), len(win)) < min_samples:
        return _untested(feature, len(ref), len(win), f"fewer than {min_samples} values")
    result = ks_2samp(ref, win)
    return {"feature": feature.name, "kind": feature.kind, "statistic": "ks", "value": float(result.statistic),
            "p_value": float(result.pvalue), "effect": float(result.statistic), "n_reference": len(ref),
            "n_window": len(win), "note": ""}


def _categorical_test(feature: Feature, reference: pd.Series, window: pd.Series, min_samples: int,
                      design_effect: float = 1.0) -> dict[str, Any]:
    from scipy.stats import chi2 as chi2_distribution
    from scipy.stats import chi2_contingency

    ref, win = _categories(reference), _categories(window)
    if min(len(ref), len(win)) < min_samples:
        return _untested(feature, len(ref), len(win), f"fewer than {min_samples} values")
    counts = pd.DataFrame({"reference": ref.value_counts(), "window": win.value_counts()}).fillna(0.0)
    counts = _pool_rare(counts)
    n = float(counts.to_numpy().sum())
    if len(counts) < 2:
        return {"feature": feature.name, "kind": feature.kind, "statistic": "chi2", "value": 0.0, "p_value": 1.0,
                "effect": 0.0, "n_reference": len(ref), "n_window": len(win), "note": "one category on both sides"}
    chi2, p, dof, _ = chi2_contingency(counts.to_numpy().T, correction=False)
    note = ""
    if design_effect != 1.0:  # Rao-Scott: the clustered counts' chi-square over the design effect
        chi2, note = chi2 / design_effect, f"chi-square / design effect {design_effect:g} (clustered by lesion)"
        p = chi2_distribution.sf(chi2, dof)
    cramers_v = math.sqrt(chi2 / n)  # 2 x k table: min(rows, cols) - 1 = 1
    return {"feature": feature.name, "kind": feature.kind, "statistic": "chi2", "value": float(chi2),
            "p_value": float(p), "effect": cramers_v, "n_reference": len(ref), "n_window": len(win), "note": note}


def _categories(values: pd.Series) -> pd.Series:
    """Values as category labels; None / NaN (a field not given, no detector) is its own category."""
    return values.astype(object).where(values.notna(), MISSING).astype(str)


def _pool_rare(counts: pd.DataFrame) -> pd.DataFrame:
    """Categories whose expected count (under no drift) is below MIN_EXPECTED on either side, pooled into one."""
    share = counts.sum(axis=1) / counts.to_numpy().sum()
    expected = np.outer(share, counts.sum(axis=0))  # (categories, 2)
    rare = (expected < MIN_EXPECTED).any(axis=1)
    if rare.sum() < 2:
        return counts  # none rare, or one: nothing to pool it with
    kept = counts[~rare]
    pooled = counts[rare].sum().to_frame(POOLED).T
    return pd.concat([kept, pooled])


def _untested(feature: Feature, n_reference: int, n_window: int, why: str) -> dict[str, Any]:
    return {"feature": feature.name, "kind": feature.kind, "statistic": "ks" if feature.kind == "numeric" else "chi2",
            "value": np.nan, "p_value": np.nan, "effect": np.nan, "n_reference": n_reference, "n_window": n_window,
            "note": f"not tested: {why}"}
