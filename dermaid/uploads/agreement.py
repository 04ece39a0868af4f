"""Agreement between dermatologists: per upload (votes, consensus, agreement share, tie) and over reviewers
(pairwise Cohen's kappa, Krippendorff's alpha).

    compute_agreement(labels.history(upload_id))
    # {"labels": 3, "reviewers": 2, "votes": {"MEL": 2}, "consensus": "MEL", "agreement": 1.0}
    is_tie(agreement)                     # >= 2 reviewers and no single most common code: ask one more
    reviewer_statistics(all_labels)       # per reviewer counts, pairwise Cohen's kappa, Krippendorff's alpha, ties

Labels are insert-only: the newest label per reviewer is that reviewer's vote (a reviewer who changes
their mind adds a newer label). Agreement is the share of reviewers whose vote is the most common
code (1.0 = unanimous); the consensus is that code, or None on a tie.

Over reviewers, chance-corrected statistics come from well-kept libraries (never hand-written):
- Cohen's kappa per pair of reviewers on the uploads both voted on (scikit-learn's cohen_kappa_score).
- Krippendorff's alpha (nominal) over all uploads with two or more votes (the `krippendorff` package), not
  Fleiss' kappa: Fleiss needs the same number of raters on every item, and here it varies (one reviewer by
  default, a second opinion on some, a third on ties). Alpha takes any number of raters per item; uploads
  with a single vote carry no pairs and drop out.
A statistic that is undefined (no pairs, or every vote one code: no expected disagreement) is None.
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dermaid.classes import REVIEW_CODES
from dermaid.uploads.db import as_utc

CONFIDENCE_LEVELS = ("low", "medium", "high")   # a reviewer's confidence in their label (labels.confidence)
ADVICE = ("none", "visit", "biopsy")            # the reviewer's advice (labels.advice): nothing, a visit, a biopsy
ALPHA_METHOD = "Krippendorff's alpha, nominal (reviewers per upload vary; Fleiss' kappa needs a fixed number)"


def latest_votes(labels: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{reviewer: their newest label} of one upload's labels (any order; same time: the larger id is newer)."""
    latest: dict[str, dict[str, Any]] = {}
    for label in sorted(labels, key=lambda row: (_when(row["created"]), row.get("id") or 0)):
        latest[label["reviewer"]] = label
    return latest


def compute_agreement(labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Labels of one upload (any order) -> votes (newest label per reviewer), consensus and agreement."""
    latest = latest_votes(labels)
    votes = collections.Counter(label["code"] for label in latest.values())
    reviewers = len(latest)
    if not reviewers:
        return {"labels": len(labels), "reviewers": 0, "votes": {}, "consensus": None, "agreement": None}
    top = max(votes.values())
    winners = sorted(code for code, n in votes.items() if n == top)
    return {
        "labels": len(labels),
        "reviewers": reviewers,
        "votes": dict(sorted(votes.items(), key=lambda item: (-item[1], item[0]))),
        "consensus": winners[0] if len(winners) == 1 else None,   # None: a tie between codes
        "agreement": top / reviewers,
    }


def is_tie(agreement: dict[str, Any]) -> bool:
    """Reviewers voted and no code has more votes than every other: the upload needs a further reviewer."""
    return agreement["reviewers"] >= 2 and agreement["consensus"] is None


def reviewer_statistics(labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every label (of any uploads) -> what the reviewers did and how far they agree beyond chance:
    {"uploads", "multi_reviewed", "ties", "reviewers": {name: counts}, "pairs": [Cohen's kappa per pair],
    "overall": {"method", "alpha", "units"}}."""
    by_upload: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for label in labels:
        by_upload[label["upload_id"]].append(label)
    votes = {upload: latest_votes(rows) for upload, rows in by_upload.items()}   # {upload: {reviewer: label}}
    ties = sum(is_tie(compute_agreement(rows)) for rows in by_upload.values())
    return {
        "uploads": len(votes),
        "multi_reviewed": sum(len(v) >= 2 for v in votes.values()),
        "ties": ties,
        "reviewers": _per_reviewer(labels, votes),
        "pairs": _pairwise_kappa(votes),
        "overall": _overall_alpha(votes),
    }


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _per_reviewer(labels: Sequence[dict[str, Any]], votes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """{reviewer: labels written, uploads voted on, votes chosen blinded, their votes' confidence and advice}."""
    rows = collections.Counter(label["reviewer"] for label in labels)
    out: dict[str, Any] = {}
    for reviewer in sorted(rows):
        mine = [v[reviewer] for v in votes.values() if reviewer in v]
        out[reviewer] = {
            "labels": rows[reviewer],
            "uploads": len(mine),
            "blinded": sum(vote.get("blinded") is True for vote in mine),
            "confidence": _counts((vote.get("confidence") for vote in mine), CONFIDENCE_LEVELS),
            "advice": _counts((vote.get("advice") for vote in mine), ADVICE),
        }
    return out


def _counts(values: Any, vocabulary: tuple[str, ...]) -> dict[str, int]:
    """Counts per vocabulary value, plus "not_given" for labels without one (older labels, API clients)."""
    counter = collections.Counter(value if value in vocabulary else "not_given" for value in values)
    return {key: counter.get(key, 0) for key in (*vocabulary, "not_given")}


def _pairwise_kappa(votes: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Cohen's kappa of each pair of reviewers over the uploads both voted on (pairs sharing none are left out)."""
    from sklearn.metrics import cohen_kappa_score

    reviewers = sorted({reviewer for v in votes.values() for reviewer in v})
    multi = [v for _, v in sorted(votes.items()) if len(v) >= 2]
    pairs = []
    for a, b in itertools.combinations(reviewers, 2):
        shared = [(v[a]["code"], v[b]["code"]) for v in multi if a in v and b in v]
        if not shared:
            continue
        first, second = (list(codes) for codes in zip(*shared))
        with warnings.catch_warnings():  # undefined (one code only): sklearn warns and returns nan
            warnings.simplefilter("ignore")
            kappa = cohen_kappa_score(first, second, labels=list(REVIEW_CODES))
        pairs.append({"reviewers": [a, b], "shared": len(shared),
                      "observed_agreement": sum(x == y for x, y in shared) / len(shared),
                      "cohen_kappa": _finite(kappa)})
    return pairs


def _overall_alpha(votes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Krippendorff's alpha (nominal) over the uploads with >= 2 votes: a units x codes matrix of vote counts."""
    import krippendorff

    index = {code: i for i, code in enumerate(REVIEW_CODES)}
    units = [v for v in votes.values() if len(v) >= 2]
    alpha = None
    if units:
        counts = np.zeros((len(units), len(REVIEW_CODES)), dtype=np.int64)
        for row, unit in enumerate(units):
            for vote in unit.values():
                counts[row, index[vote["code"]]] += 1
        if np.count_nonzero(counts.sum(axis=0)) >= 2:  # one code only: no expected disagreement, alpha undefined
            alpha = _finite(krippendorff.alpha(value_counts=counts, value_domain=list(range(len(REVIEW_CODES))),
                                               level_of_measurement="nominal"))
    return {"method": ALPHA_METHOD, "alpha": alpha, "units": len(units)}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _when(value: Any) -> _dt.datetime:
    """A label's created time (datetime or ISO text) as an aware UTC datetime, for ordering."""
    return as_utc(_dt.datetime.fromisoformat(value) if isinstance(value, str) else value)
