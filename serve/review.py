"""The web pages and the dermatologist review API: one FastAPI APIRouter the ingress includes with one line.

    api.include_router(review.router)       # serve/ingress.py, before the @serve.ingress class freezes `api`
    settings["review"] = review_settings(args.review)                     # in build_app (token hashes only)
    self.review = create_review_context(self.store, settings["review"])   # in the Ingress __init__

Pages (plain HTML, CSS and JavaScript in serve/web/; no build step):
    GET /                 the consumer page: photo -> probabilities, saliency overlay, triage, disclaimer
    GET /review           the dermatologist page: token -> queue -> image -> label -> prediction, saliency, labels
    GET /web/{file}       their CSS and JavaScript
Review API (header `Authorization: Bearer <dermatologist token>`: 401 without one, 403 for a wrong one):
    GET  /v1/review/me                               who the token belongs to
    GET  /v1/review/queue?top_class=&labels_below=1&limit=&offset=   consented, unlabeled or tied, refused first
    GET  /v1/review/uploads/{id}                     metadata, prediction, label history, agreement
    GET  /v1/review/uploads/{id}/image?kind=image    the photo (kind=input: what the model saw, PNG)
    GET  /v1/review/uploads/{id}/labels              label history + agreement
    POST /v1/review/uploads/{id}/labels              {"code": "MEL", "comment": "...", "confidence": "high",
                                                      "advice": "biopsy"} -> 201
    GET  /v1/review/labeled?min_agreement=0.6        labeled uploads with a consensus
    GET  /v1/review/stats                            per reviewer counts, pairwise Cohen's kappa, Krippendorff's alpha
    GET  /v1/review/labelstudio/config               the Label Studio labeling config (XML)
    GET  /v1/review/labelstudio/tasks                pending uploads as Label Studio tasks (blinded: no pre-annotation)
    POST /v1/review/labelstudio/import               a Label Studio JSON export -> labels (idempotent)
    GET  /v1/review/model                            the whole model card (a route of the Ingress: serve/ingress.py)
The token is checked before a request body is read: the POST routes take no Body() parameter (FastAPI would
parse it before any dependency) and read their JSON with serve.errors.read_json, capped per route
(LABEL_BODY_LIMIT, IMPORT_BODY_LIMIT: far below the upload limit).

Blinded review (`review.blinded`, default true; dermaid.uploads.labels): until the token's reviewer has labelled an
upload, its item and labels carry no prediction, labels or agreement (revealed: false), the queue shows no
prediction (only model_refused) and is not filtered by class, /labeled leaves out uploads they have not labelled,
and Label Studio tasks carry no pre-annotation. The page asks for the label first and reveals the rest after it.

Errors are raised as HTTPException and rendered by the ingress in its one JSON shape
({"error": {"code", "message"}}). Reviewer names come from the token, never from a request body.
Everything shown is decision support for research, never a diagnosis.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path as PathParam, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from dermaid.auth import ReviewerTokens, parse_bearer
from dermaid.classes import AGE_RANGE, CLASS_CODES, DISCLAIMER, NOT_A_LESION, REVIEW_CODES, SEXES, SITES, class_table
from dermaid.errors import DermaidError
from dermaid.files import is_local
from dermaid.uploads.agreement import ADVICE, CONFIDENCE_LEVELS
from dermaid.uploads.labels import MAX_OFFSET, MAX_PAGE, LabelStore, public_upload
from dermaid.uploads.labelstudio import LABELSTUDIO_CONFIG
from dermaid.uploads.reviewers import ReviewerTokenStore
from dermaid.uploads.validation import MAX_COMMENT_CHARS, InvalidUploadId, UnknownUpload
from serve.args import MIB, ReviewArgs
from serve.errors import NO_STORE, no_store_json, read_json

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_FILES = {"app.css": "text/css", "common.js": "text/javascript", "consumer.js": "text/javascript",
                "review.js": "text/javascript"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
LABEL_BODY_LIMIT = 32 * 1024    # a label: a code and <= 2000 comment characters (12 KB even if all \u-escaped)
IMPORT_BODY_LIMIT = 4 * MIB     # a Label Studio export of ~2000 annotated tasks; split larger ones


def review_settings(args: ReviewArgs) -> dict[str, Any]:
    """Resolve the tokens where the app is built: config hashes + the environment's tokens, hashed.

    Only hashes cross into the replicas; a malformed entry, a pbkdf2 hash, a bare or guessable environment
    token fails here, before anything is deployed. Tokens in the uploads database (`dermaid reviewers add`)
    are read by the replicas per request (ReviewContext.reviewer).
    """
    return {"tokens": ReviewerTokens.from_settings(args.model_dump()).hashes(), "tokens_env": args.tokens_env,
            "blinded": args.blinded}


@dataclass
class ReviewContext:
    """What the review routes need inside the ingress replica."""

    labels: LabelStore
    tokens: ReviewerTokens                 # review.tokens + $DERMAID_REVIEWER_TOKENS: fixed for this deploy
    database_tokens: ReviewerTokenStore    # reviewer_tokens (`dermaid reviewers add|revoke`): read per request

    def reviewer(self, token: str) -> str | None:
        """Who holds `token`: the deploy's tokens (in memory), else the database's active ones (one indexed
        query, no cache: a revoked token is refused by the next request). Same cost for every wrong token."""
        return self.tokens.verify(token) or self.database_tokens.lookup(token)


def create_review_context(upload_store: Any, settings: dict[str, Any]) -> ReviewContext:
    """Labels and reviewer tokens on the ingress' UploadStore (same database) + the token hashes and the blinded
    switch of `review_settings(...)` (blinded unless it says otherwise)."""
    return ReviewContext(LabelStore(upload_store, blinded=settings.get("blinded", True)),
                         ReviewerTokens(settings["tokens"]),
                         ReviewerTokenStore(upload_store.engine))


def replica_attribute(name: str, missing: str) -> Any:
    """An attribute of this Serve replica's ingress object (a route's context); 503 `missing` without one."""
    value = servable_attribute(name)
    if value is None:
        raise HTTPException(503, missing)
    return value


def servable_attribute(name: str) -> Any:
    """An attribute of this Serve replica's ingress object; None outside a replica or before its __init__ set it."""
    from ray import serve

    try:
        return getattr(serve.get_replica_context().servable_object, name, None)
    except Exception:  # noqa: BLE001 - not inside a replica
        return None


def get_review_context() -> ReviewContext:
    """The ReviewContext of this Serve replica (the ingress object's `review` attribute)."""
    return replica_attribute("review", "dermatologist review is not configured on this server")


def require_reviewer(request: Request, context: Annotated[ReviewContext, Depends(get_review_context)]) -> str:
    """The reviewer named by the bearer token: 401 without a token, 403 for one that is not a reviewer's."""
    token = parse_bearer(request.headers.get("authorization"))
    if token is None:
        raise HTTPException(401, "a dermatologist token is required: send the header 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    try:
        reviewer = context.reviewer(token)
    except SQLAlchemyError:
        raise HTTPException(503, "the reviewer tokens cannot be checked now (database unavailable); "
                                 "try again shortly") from None
    if reviewer is None:
        raise HTTPException(403, "this token is not a dermatologist token")
    return reviewer


Context = Annotated[ReviewContext, Depends(get_review_context)]
Reviewer = Annotated[str, Depends(require_reviewer)]
UploadId = Annotated[str, PathParam(description="upload id (uuid4)", max_length=64)]
TopClass = Annotated[Literal[CLASS_CODES] | None,  # type: ignore[valid-type]
                     Query(description="the model's predicted class")]

router = APIRouter()
review_api = APIRouter(prefix="/v1/review", tags=["review"], dependencies=[Depends(require_reviewer)],
                responses={401: {"description": "no token"}, 403: {"description": "not a dermatologist token"}})


def _json_body_doc(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """OpenAPI for a route that reads its JSON body itself (serve.errors.read_json) instead of a Body() parameter."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": schema}}}}


class LabelIn(BaseModel):
    code: str = Field(description=f"one of {', '.join(REVIEW_CODES)} ({NOT_A_LESION}: not a lesion / unusable)")
    comment: str | None = Field(None, description=f"optional, at most {MAX_COMMENT_CHARS} characters")
    source: Literal["web", "api"] = Field("api", description="web: the review page; api: any other client")
    confidence: Literal[CONFIDENCE_LEVELS] | None = Field(  # type: ignore[valid-type]
        None, description=f"the reviewer's confidence: {', '.join(CONFIDENCE_LEVELS)} (optional)")
    advice: Literal[ADVICE] | None = Field(  # type: ignore[valid-type]
        None, description=f"advised next step: {', '.join(ADVICE)} (none; an in-person visit; a biopsy; optional)")


# --- pages ---------------------------------------------------------------------------------------------------

@router.get("/", include_in_schema=False)
def consumer_page(request: Request) -> HTMLResponse:
    return _page("index.html", request)


@router.get("/review", include_in_schema=False)
def review_page(request: Request) -> HTMLResponse:
    return _page("review.html", request)


@router.get("/web/{name}", include_in_schema=False)
def static_file(name: str) -> Response:
    media = STATIC_FILES.get(name)  # an allow-list: no path from the request reaches the file system
    if media is None:
        raise HTTPException(404, f"no such file: {name[:60]}")
    return Response(_read_web(name), media_type=f"{media}; charset=utf-8", headers=PAGE_HEADERS)


# --- review API ----------------------------------------------------------------------------------------------

@review_api.get("/me")
def me(reviewer: Reviewer) -> Response:
    return no_store_json({"reviewer": reviewer, "disclaimer": DISCLAIMER})


@review_api.get("/queue")
def queue(context: Context, reviewer: Reviewer, top_class: TopClass = None,
          labels_below: Annotated[int, Query(ge=1, le=100, description="fewer reviewers than this")] = 1,
          limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
          offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    """Consented uploads with fewer than labels_below reviewers or whose reviewers tie, none labelled by this
    one; the photos the model refused first, then ties, then highest entropy. Blinded: no prediction shown."""
    page = _call(context.labels.queue, top_class=top_class, reviewer=reviewer, labels_below=labels_below,
                 limit=limit, offset=offset)
    return no_store_json({**page, "blinded": context.labels.blinded,
                  "order": "photos the model refused first, then ties (needs_tiebreak), then the entropy of the "
                           "calibrated probabilities, highest first", "disclaimer": DISCLAIMER})


@review_api.get("/uploads/{upload_id}")
def upload_item(context: Context, reviewer: Reviewer, upload_id: UploadId) -> Response:
    """Metadata, prediction, labels and agreement; blinded: the prediction and labels after this reviewer's own."""
    return no_store_json({**_call(context.labels.item, upload_id, reviewer), "disclaimer": DISCLAIMER})


@review_api.get("/uploads/{upload_id}/image", responses={200: {"content": {"image/*": {}}}})
def upload_image(context: Context, upload_id: UploadId,
                 kind: Annotated[Literal["image", "input"],
                                 Query(description="image: the photo; input: what the model saw")] = "image",
                 ) -> Response:
    data, media = _call(context.labels.read_image, upload_id, kind)
    return Response(data, media_type=media, headers={**NO_STORE, "X-Content-Type-Options": "nosniff"})


@review_api.get("/uploads/{upload_id}/labels")
def upload_labels(context: Context, reviewer: Reviewer, upload_id: UploadId) -> Response:
    """Label history + agreement (blinded: null until this reviewer has labelled the upload)."""
    return no_store_json(_call(context.labels.labels_view, upload_id, reviewer))


@review_api.post("/uploads/{upload_id}/labels", status_code=201,
                 openapi_extra=_json_body_doc(LabelIn.model_json_schema(), "the label"))
async def add_label(request: Request, context: Context, reviewer: Reviewer, upload_id: UploadId) -> Response:
    """Add this reviewer's label (earlier labels are kept: the newest label per reviewer is their vote)."""
    body = _label_in(await read_json(request, LABEL_BODY_LIMIT))  # the token was checked before this read

    def add() -> dict[str, Any]:
        label = _call(context.labels.add, upload_id, reviewer, body.code, body.comment, source=body.source,
                      confidence=body.confidence, advice=body.advice)
        return {"label": label, "agreement": _call(context.labels.agreement, label["upload_id"])}

    return no_store_json(await run_in_threadpool(add), status=201)


@review_api.get("/labeled")
def labeled(context: Context, reviewer: Reviewer,
            min_agreement: Annotated[float, Query(ge=0.0, le=1.0)] = 0.0,
            min_reviewers: Annotated[int, Query(ge=1, le=100)] = 1) -> Response:
    """Uploads with a consensus label that reach the thresholds (what `dermaid labels-export` would write);
    blinded: only those this reviewer has labelled (the others' consensus would show before they choose)."""
    items = _call(context.labels.labeled, min_agreement, min_reviewers)
    shown = items
    if context.labels.blinded:
        mine = _call(context.labels.labeled_by, reviewer)
        shown = [item for item in items if item["upload"]["id"] in mine]
    rows = [{"upload": public_upload(item["upload"]), "agreement": item["agreement"]} for item in shown]
    return no_store_json({"items": rows, "total": len(rows), "withheld": len(items) - len(shown)})


@review_api.get("/stats")
def stats(context: Context) -> Response:
    """Per reviewer counts (labels, uploads, blinded votes, confidence, advice), Cohen's kappa per pair of
    reviewers, Krippendorff's alpha over all (reviewers per upload vary, which Fleiss' kappa cannot take), ties."""
    return no_store_json({**_call(context.labels.statistics), "blinded": context.labels.blinded, "disclaimer": DISCLAIMER})


@review_api.get("/labelstudio/config", response_class=PlainTextResponse)
def labelstudio_config() -> PlainTextResponse:
    """The Label Studio labeling config the tasks and the import expect (paste it into the project settings)."""
    return PlainTextResponse(LABELSTUDIO_CONFIG, media_type="application/xml", headers=NO_STORE)


@review_api.get("/labelstudio/tasks")
def labelstudio_tasks(request: Request, context: Context, top_class: TopClass = None,
                      limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
                      offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                      images: Annotated[Literal["api", "storage"], Query(
                          description="api: this server's image route (needs the token); storage: the blob URL "
                                      "(gs://..., for a Label Studio cloud storage source; remote storage "
                                      "only)")] = "api") -> Response:
    """Pending uploads as Label Studio tasks JSON (import it in Label Studio), most uncertain first; the model's
    class pre-annotated only when the review is not blinded."""
    base = str(request.base_url).rstrip("/")
    if images == "storage" and is_local(context.labels.uploads.storage_url):
        raise HTTPException(422, "images: storage names blob URLs, and this server keeps uploads on its own disk "
                                 "(paths that are of no use to Label Studio and stay on the server); use images=api")

    def image_url(upload: dict[str, Any]) -> str:
        if images == "storage":
            return context.labels.uploads.url(upload["blobs"]["image"])
        return f"{base}/v1/review/uploads/{upload['id']}/image"

    tasks = _call(context.labels.labelstudio_tasks, image_url, top_class=top_class, limit=limit, offset=offset)
    return no_store_json(tasks, headers={"Content-Disposition": 'attachment; filename="dermaid-labelstudio-tasks.json"'})


@review_api.post("/labelstudio/import", openapi_extra=_json_body_doc(
    {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "object"}]},
    f"Label Studio Export -> JSON (at most {IMPORT_BODY_LIMIT // MIB} MiB)"))
async def labelstudio_import(request: Request, context: Context, reviewer: Reviewer) -> Response:
    """Store the annotations of a Label Studio JSON export as this token's reviewer's labels (all or nothing; a
    re-import adds nothing). The file's completed_by and created_at decide nothing: the labels are the token
    holder's, dated no later than now (LabelStore.import_labelstudio)."""
    export = await read_json(request, IMPORT_BODY_LIMIT)  # the token was checked before this read
    return no_store_json(await run_in_threadpool(_call, context.labels.import_labelstudio, export, reviewer=reviewer))


router.include_router(review_api)


# --- helpers -------------------------------------------------------------------------------------------------

def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a store call; its DermaidErrors become 4xx: a malformed id 400, an unknown upload 404, else 422."""
    try:
        return fn(*args, **kwargs)
    except InvalidUploadId as exc:
        raise HTTPException(400, str(exc)) from None
    except UnknownUpload as exc:
        raise HTTPException(404, str(exc)) from None
    except DermaidError as exc:
        raise HTTPException(422, str(exc)) from None
    except FileNotFoundError:
        raise HTTPException(404, "the stored image of this upload is missing") from None


def _label_in(data: Any) -> LabelIn:
    """A parsed label body as LabelIn; 422 naming the field as for any other request (serve.errors)."""
    try:
        return LabelIn.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@lru_cache(maxsize=16)
def _read_web(name: str) -> bytes:
    return (WEB_DIR / name).read_bytes()


def _page_config() -> dict[str, Any]:
    """What the pages need from dermaid.classes (one definition: nothing is spelled twice in the HTML)."""
    return {"classes": class_table(), "review_codes": list(REVIEW_CODES), "not_a_lesion": NOT_A_LESION,
            "sexes": list(SEXES), "sites": list(SITES), "age_range": list(AGE_RANGE), "disclaimer": DISCLAIMER,
            "max_comment_chars": MAX_COMMENT_CHARS, "confidence_levels": list(CONFIDENCE_LEVELS),
            "advice": list(ADVICE)}


def _page(name: str, request: Request) -> HTMLResponse:
    """A page with its <base href> (so it works under any route prefix) and the class/vocabulary config."""
    base = (request.scope.get("root_path") or "").rstrip("/") + "/"
    config = json.dumps(_page_config()).replace("</", "<\\/")
    text = _read_web(name).decode("utf-8")
    text = (text.replace("{{BASE}}", html.escape(base, quote=True))
            .replace("{{CONFIG}}", config)
            .replace("{{DISCLAIMER}}", html.escape(DISCLAIMER)))
    return HTMLResponse(text, headers=PAGE_HEADERS)
