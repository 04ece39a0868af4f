"""What a consumer may do with their own upload: look up its review state, delete it (reference + token).

    state = upload_state(store, upload_id, retention_days=30)   # after store.holds_token(upload_id, token)
    # {"reference", "uploaded", "state": "waiting_for_review" | "reviewed" | "not_reviewable", "message", ...}
    deleted_answer(store.delete(upload_id))                       # what a deletion removed, in words

The states, from the dermatologists' labels (dermaid.uploads.agreement: the newest label per reviewer is a vote):
    waiting_for_review   no dermatologist has labelled it yet (`delete_after`: when the retention purge removes it),
                         or its reviewers tie (reason "tie": it is back in the review queue for another opinion,
                         dermaid.uploads.agreement.is_tie; the purge keeps it)
    reviewed             the votes have one most common diagnosis: `class` {code, name, description}, reviewers,
                         agreement (the share of reviewers who chose it)
    not_reviewable       the most common vote is NONE: not a skin lesion, or a photo too poor to judge
                         (reason "not_a_lesion")
Every answer carries the disclaimer: a dermatologist's look at a photo is decision support, never a diagnosis.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from dermaid.classes import BY_CODE, DISCLAIMER, NOT_A_LESION
from dermaid.uploads.db import as_utc
from dermaid.uploads.labels import LabelStore, iso_time
from dermaid.uploads.store import DeletedUpload, UploadStore

WAITING = "waiting_for_review"
REVIEWED = "reviewed"
NOT_REVIEWABLE = "not_reviewable"
STATES = (WAITING, REVIEWED, NOT_REVIEWABLE)


def upload_state(store: UploadStore, upload_id: str, retention_days: float | None = None) -> dict[str, Any] | None:
    """The consumer's view of one upload (None: it is gone). Call it only after `store.holds_token`."""
    row = store.get(upload_id)
    if row is None:
        return None
    agreement = LabelStore(store).agreement(upload_id)
    created = _dt.datetime.fromisoformat(row["created"]) if isinstance(row["created"], str) else row["created"]
    base = {"reference": row["id"], "uploaded": iso_time(created), "disclaimer": DISCLAIMER}
    if not agreement["reviewers"]:
        return {**base, **_waiting(created, retention_days)}
    consensus = agreement["consensus"]
    if consensus is None:
        return {**base, "state": WAITING, "reason": "tie", "reviewers": agreement["reviewers"], "delete_after": None,
                "message": "The dermatologists who looked at this photo so far do not agree on one kind of spot; "
                           "it waits for another dermatologist's opinion."}
    if consensus == NOT_A_LESION:
        return {**base, "state": NOT_REVIEWABLE, "reason": "not_a_lesion", "reviewers": agreement["reviewers"],
                "message": "The dermatologists who looked at this photo could not assess it: it does not show a "
                           "skin spot clearly enough (or not a skin spot at all)."}
    diagnosis = BY_CODE[consensus]
    reviewers = agreement["reviewers"]
    return {**base, "state": REVIEWED, "reviewers": reviewers, "agreement": agreement["agreement"],
            "class": {"code": diagnosis.code, "name": diagnosis.name, "description": diagnosis.description},
            "message": f"{_count(reviewers, 'dermatologist')} looked at this photo; "
                       f"{_share(agreement['agreement'], reviewers)} saw: {diagnosis.name}. "
                       f"{diagnosis.description} This is a review of a photo, not a diagnosis."}


def deleted_answer(deleted: DeletedUpload) -> dict[str, Any]:
    """What DELETE /v1/uploads/{ref} answers: the photo and its data are gone; an earlier labels export is named."""
    exported = iso_time(deleted.exported) if deleted.exported else None
    message = "Your photo, its details and any review of it have been deleted from DermAID."
    if exported:
        message += (f" Before that, its review was copied into a training dataset (on {exported[:10]}); that copy "
                    "stays in the dataset made then, and no later dataset will contain it.")
    return {"deleted": True, "reference": deleted.upload_id, "labels_removed": deleted.labels,
            "exported": exported, "message": message}


def _waiting(created: _dt.datetime, retention_days: float | None) -> dict[str, Any]:
    message = "No dermatologist has reviewed this photo yet."
    delete_after = None
    if retention_days:
        when = as_utc(created) + _dt.timedelta(days=float(retention_days))
        delete_after = when.isoformat(timespec="seconds")
        message += f" If none has by {when.date().isoformat()}, the photo is deleted then."
    return {"state": WAITING, "delete_after": delete_after, "message": message}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _share(agreement: float, reviewers: int) -> str:
    if reviewers == 1:
        return "they"
    if agreement >= 1.0:
        return "all of them"
    return f"{round(agreement * reviewers)} of them"

