"""Agreement between dermatologists on one upload: votes, consensus, agreement share.

    compute_agreement(labels.history(upload_id))
    # {"labels": 3, "reviewers": 2, "votes": {"MEL": 2}, "consensus": "MEL", "agreement": 1.0}

Labels are insert-only: the newest label per reviewer is that reviewer's vote (a reviewer who changes
their mind adds a newer label). Agreement is the share of reviewers whose vote is the most common
code (1.0 = unanimous); the consensus is that code, or None on a tie.
"""

from __future__ import annotations

import collections
import datetime as _dt
from collections.abc import Sequence
from typing import Any


def compute_agreement(labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Labels of one upload (any order) -> votes (newest label per reviewer), consensus and agreement."""
    latest: dict[str, dict[str, Any]] = {}
    for label in sorted(labels, key=lambda row: (_when(row["created"]), row.get("id") or 0)):
        latest[label["reviewer"]] = label
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


def _when(value: Any) -> _dt.datetime:
    """A label's created time (datetime or ISO text) as an aware UTC datetime, for ordering."""
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
