"""What the HTTP routes take and return, as FastAPI reads it: form fields and response bodies (OpenAPI at /docs).

No `from __future__ import annotations` here or in serve/ingress.py: FastAPI reads these annotations at runtime.
"""

from typing import Annotated, Any, Literal

from fastapi import Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, Field

from dermaid.classes import AGE_RANGE, CLASS_CODES, SEXES, SITES
from dermaid.inference import CAM_METHODS
from serve.errors import ALLOWED_VALUES, ApiError, ErrorResponse

# --- form fields ---------------------------------------------------------------------------------------------

ImageFile = Annotated[UploadFile, File(description=ALLOWED_VALUES["image"] + "; the content decides the format")]
Age = Annotated[float | None, Form(ge=AGE_RANGE[0], le=AGE_RANGE[1], description="age in years")]
Sex = Annotated[Literal[SEXES] | None, Form(description="sex")]  # type: ignore[valid-type]
Site = Annotated[Literal[SITES] | None, Form(description="anatomical site (ISIC 2019)")]  # type: ignore[valid-type]
Consent = Annotated[bool, Form(description="store the upload for dermatologist review")]
Target = Annotated[Literal[CLASS_CODES] | None,  # type: ignore[valid-type]
                   Form(description="class code; default: top class")]
Method = Annotated[Literal[CAM_METHODS], Form(description="CAM method")]  # type: ignore[valid-type]
SaliencyFormat = Annotated[Literal["png", "json"], Form(description="png image or json with base64")]
FullSize = Annotated[bool, Form(description="overlay at the upload's own size; default: scaled to at most "
                                           "overlay_max_side pixels (2048) on its long side")]


def only_fields(*names: str) -> Any:
    """A route dependency: 422 for a form field the route does not take. A misspelt field (`gender` for
    `sex`) would otherwise be dropped without a word, and the prediction made without that metadata."""
    allowed = ", ".join(names)

    async def check(request: Request) -> None:
        unknown = sorted(set((await request.form()).keys()) - set(names))  # parsed once, cached for the route
        if unknown:
            fields = [{"field": name, "message": "unknown field", "allowed": allowed} for name in unknown]
            raise ApiError(422, "invalid_field", "; ".join(f"{name}: unknown field; allowed fields: {allowed}"
                                                           for name in unknown), fields)

    return Depends(check)


# --- responses -----------------------------------------------------------------------------------------------

class ClassProbability(BaseModel):
    code: str
    name: str
    probability: float


class Triage(BaseModel):
    level: Literal["low", "moderate", "high"]
    message: str


OOD_SCORE = "out-of-distribution score, higher = less like the training images; null: no OOD detector"
ABSTAIN = ("true: the photo does not look like the lesion photos the model knows, no diagnosis is given; "
           "null: no OOD detector (run `dermaid calibrate`)")
RELIABLE = "false when the model abstained: the probabilities are then not to be relied on"


class AbstentionFields(BaseModel):
    """What every prediction answer says about abstention (classify and saliency's JSON)."""

    probabilities_reliable: bool = Field(description=RELIABLE)
    ood_score: float | None = Field(description=OOD_SCORE)
    abstain: bool | None = Field(description=ABSTAIN)
    message: str | None = Field(description="the retake message when the model abstained, else null")
    disclaimer: str


class ClassifyResponse(AbstentionFields):
    upload_id: str | None = Field(description="the reference of the stored upload (only with consent; null for a "
                                              "photo stored before, see duplicate)")
    stored: bool
    lookup_token: str | None = Field(description="the secret key to this upload (only with consent, only in this "
                                                 "answer, never again; the server keeps its digest): GET or DELETE "
                                                 "/v1/uploads/{upload_id} with 'Authorization: Bearer <lookup_token>'")
    duplicate: bool = Field(description="true: this exact photo was stored before with consent; it is not stored "
                                        "again and no reference or key is given (whoever sent it first holds them)")
    model_version: str = Field(description="the model card's id of the model that answered")
    registry_version: str | None = Field(None, description="NAME@VERSION of the registry version that answered "
                                                           "(also in the X-DermAID-Model-Version header); null when "
                                                           "serving a checkpoint directly")
    probabilities: list[ClassProbability] = Field(description="all 8 classes, most probable first")
    top: ClassProbability | None = Field(description="most probable class; null when the model abstained")
    malignancy_score: float | None = Field(description="summed probability of the malignant classes; null when "
                                                       "the model abstained")
    triage: Triage | None = Field(description="null when the model abstained")


class SaliencyResponse(AbstentionFields):
    """/v1/saliency with format=json (format=png: the overlay, with X-DermAID-OOD-Score / -Abstain headers)."""

    target: str
    name: str
    probability: float
    method: str
    layer: str
    width: int = Field(description="the overlay's width: the upload's, scaled to overlay_max_side unless full_size")
    height: int = Field(description="the overlay's height (the upload's aspect ratio)")
    model_version: str
    registry_version: str | None = Field(None, description="NAME@VERSION of the registry version whose Grad-CAM "
                                                           "this is (null for a plain checkpoint)")
    overlay_png_base64: str


class ModelResponse(BaseModel):
    model_version: str
    card: dict[str, Any] = Field(description="the public part of the checkpoint's card (classes, input, calibration, "
                                             "validation metrics, intended use); the whole card: GET /v1/review/model")
    ood: dict[str, Any] = Field(description="{method, threshold, refuse_share}, or {missing: true, how} for a "
                                            "checkpoint without OOD statistics")
    triage: dict[str, Any] | None = Field(description="the validation-chosen triage operating point (cutoff, "
                                                      "sensitivity, specificity, counts); null: fixed cut-offs")
    disclaimer: str


class PrivacyResponse(BaseModel):
    """GET /v1/privacy: the privacy note of the consumer page, from this server's settings."""

    retention_days: float | None = Field(description="days an unreviewed upload is kept; null: until deleted")
    stored: str
    who_sees_it: str
    how_long: str
    how_to_delete: str
    without_consent: str
    disclaimer: str


class ReviewedClass(BaseModel):
    code: str
    name: str
    description: str


STATE_REASON = ("not_reviewable: not_a_lesion (not a skin spot, or too poor to judge); waiting_for_review: tie "
                "(the reviewers disagree so far; another opinion is asked)")


class UploadStateResponse(BaseModel):
    """GET /v1/uploads/{ref}: the consumer's view of their upload (serve/uploads_api.py)."""

    reference: str
    uploaded: str
    state: Literal["waiting_for_review", "reviewed", "not_reviewable"]
    message: str = Field(description="the state in plain words")
    delete_after: str | None = Field(None, description="waiting_for_review: when the retention purge deletes it")
    reviewers: int | None = Field(None, description="how many dermatologists labelled it")
    agreement: float | None = Field(None, description="reviewed: the share of reviewers who chose `class`")
    class_: ReviewedClass | None = Field(None, alias="class", description="reviewed: the most common diagnosis")
    reason: Literal["not_a_lesion", "tie"] | None = Field(None, description=STATE_REASON)
    disclaimer: str


class UploadDeletedResponse(BaseModel):
    """DELETE /v1/uploads/{ref}."""

    deleted: bool
    reference: str
    labels_removed: int
    exported: str | None = Field(description="when its review first went into a labels export (that dataset keeps "
                                             "its copy; later exports leave it out); null: never")
    message: str


ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 429, 503)}
