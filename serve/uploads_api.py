"""The consumer's own upload: look up its review, delete it, and what is stored. One APIRouter the ingress includes.

    api.include_router(uploads_api.router)                                  # serve/ingress.py, before the class
    self.consumer = create_consumer_context(self.store, settings["storage"])  # in the Ingress __init__
    consent_fields(saved)                                                   # the consent part of /v1/classify

Routes (header `Authorization: Bearer <lookup token>`, the token /v1/classify returned once with consent=true):
    GET    /v1/uploads/{ref}    {reference, uploaded, state: waiting_for_review | reviewed | not_reviewable, message,
                                 ...} (dermaid.uploads.consumer: states and words), with the disclaimer
    DELETE /v1/uploads/{ref}    removes the photo's blobs, its row and its labels -> {deleted, reference,
                                 labels_removed, exported: when its review went into a labels export, or null}
    GET    /v1/privacy          what is stored, who sees it, for how long (storage.retention_days), how to delete it
A wrong, missing or malformed token and an unknown or malformed reference get the same 404 not_found, after the
same work (UploadStore.holds_token): nobody learns whether a reference exists. The token travels in the header
only, never in a URL (URLs end up in logs and browser history); answers carry Cache-Control: no-store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path as PathParam, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from dermaid.auth import parse_bearer
from dermaid.classes import DISCLAIMER
from dermaid.uploads.consumer import deleted_answer, upload_state
from dermaid.uploads.store import SavedUpload, UploadStore
from dermaid.uploads.validation import parse_upload_id
from serve.errors import ApiError, ErrorResponse, no_store_json
from serve.review import replica_attribute
from serve.schemas import PrivacyResponse, UploadDeletedResponse, UploadStateResponse

NOT_FOUND = "no upload matches this reference and token (check both; a deleted photo is gone for good)"
STORED = ("the photo, re-encoded without its hidden file information (location, device, time and other "
          "metadata); the age, sex and body site you gave; the model's answer")
WHO = "dermatologists who review photos to improve DermAID (and the people who run this server)"
HOW_TO_DELETE = ("with the reference and the secret key shown once after the upload: GET /v1/uploads/{reference} "
                 "shows the review, DELETE /v1/uploads/{reference} removes the photo (header Authorization: Bearer "
                 "<key>); the consumer page does both")


@dataclass
class ConsumerContext:
    """What the consumer routes need inside the ingress replica: its UploadStore and storage.retention_days."""

    store: UploadStore
    retention_days: float | None


def create_consumer_context(store: UploadStore, storage: dict[str, Any]) -> ConsumerContext:
    return ConsumerContext(store, storage.get("retention_days"))


def get_consumer_context() -> ConsumerContext:
    """The ConsumerContext of this Serve replica (the ingress object's `consumer` attribute)."""
    return replica_attribute("consumer", "uploads are not configured on this server")


def consent_fields(saved: SavedUpload | None, consent: bool) -> dict[str, Any]:
    """The consent part of a /v1/classify answer. A new upload: its reference and its lookup token (here once,
    never again). A duplicate: stored, with neither (the earlier upload is not this sender's to see)."""
    if not consent or saved is None:
        return {"upload_id": None, "stored": False, "duplicate": False, "lookup_token": None}
    return {"upload_id": saved.upload_id, "stored": True, "duplicate": saved.duplicate_of is not None,
            "lookup_token": saved.lookup_token}


def privacy_body(retention_days: float | None) -> dict[str, Any]:
    """GET /v1/privacy: what the page's privacy note says, from this server's settings."""
    if retention_days:
        keep = (f"a photo no dermatologist has reviewed is deleted after {retention_days:g} days; a reviewed photo "
                "is kept until you delete it")
    else:
        keep = "until you delete it (this server deletes nothing automatically)"
    return {"retention_days": retention_days, "stored": STORED, "who_sees_it": WHO, "how_long": keep,
            "how_to_delete": HOW_TO_DELETE, "without_consent": "nothing is stored", "disclaimer": DISCLAIMER}


Context = Annotated[ConsumerContext, Depends(get_consumer_context)]
Reference = Annotated[str, PathParam(description="the reference (upload id) /v1/classify returned")]
NOT_FOUND_DOC = {404: {"model": ErrorResponse, "description": "no upload with this reference and token"}}

router = APIRouter(tags=["uploads"])


@router.get("/v1/privacy", response_model=PrivacyResponse)
def privacy(context: Context) -> Response:
    """What is stored with consent, who sees it, how long it is kept (storage.retention_days), how to delete it."""
    return JSONResponse(privacy_body(context.retention_days))   # public wording: cacheable


@router.get("/v1/uploads/{ref}", response_model=UploadStateResponse, responses=NOT_FOUND_DOC)
def lookup(request: Request, context: Context, ref: Reference) -> Response:
    """The review state of your upload: waiting for review, reviewed (the dermatologists' most common diagnosis
    in plain words), or not reviewable. Header `Authorization: Bearer <the token you got with the reference>`."""
    upload_id = _authorize(request, context, ref)
    state = _database(upload_state, context.store, upload_id, context.retention_days)
    if state is None:
        raise ApiError(404, "not_found", NOT_FOUND)  # deleted between the check and the read
    return no_store_json(state)


@router.delete("/v1/uploads/{ref}", response_model=UploadDeletedResponse, responses=NOT_FOUND_DOC)
def delete_upload(request: Request, context: Context, ref: Reference) -> Response:
    """Delete your upload: the photo, what the model saw, the record, the row and the dermatologists' labels.
    `exported` says when its review went into a labels export (a dataset made then keeps its copy; later ones
    leave it out). Header `Authorization: Bearer <token>`."""
    upload_id = _authorize(request, context, ref)
    deleted = _database(context.store.delete, upload_id)
    if deleted is None:
        raise ApiError(404, "not_found", NOT_FOUND)  # deleted by another request in between
    return no_store_json(deleted_answer(deleted))


# --- helpers -------------------------------------------------------------------------------------------------

def _authorize(request: Request, context: ConsumerContext, ref: str) -> str:
    """The reference's canonical id when the bearer token is its lookup token; else 404, whatever was wrong."""
    token = parse_bearer(request.headers.get("authorization"))
    if not _database(context.store.holds_token, ref, token):
        raise ApiError(404, "not_found", NOT_FOUND)
    return parse_upload_id(ref)  # well-formed: holds_token found it


def _database(fn: Any, *args: Any) -> Any:
    """A store call; an unreachable database is 503 (try again), never a stack trace."""
    try:
        return fn(*args)
    except SQLAlchemyError:
        raise ApiError(503, "unavailable", "the uploads database cannot be reached now; try again shortly") from None
    except OSError:
        raise ApiError(503, "unavailable", "the photo store cannot be changed now; nothing was deleted, try again "
                                           "shortly") from None

