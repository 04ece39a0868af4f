"""The Ingress deployment: DermAID's FastAPI app (validation, limits, the uploads store) in front of the models.

Routes (OpenAPI at /docs):
    POST /v1/classify   multipart: image, optional age (0-120), sex, site, consent (store for review)
    POST /v1/saliency   the same plus target (class code), method (gradcam, ...), format (png | json)
    GET  /v1/model      the model card, the OOD detector (or how to add one), the triage operating point
    GET  /healthz       alive                 GET /readyz   model loaded
    GET  /, /review     the consumer page and the dermatologist review page (serve/review.py, serve/web/)
    /v1/review/...      the dermatologist review API, bearer tokens (serve/review.py)

Every answer carries ood_score and abstain (null / null for a checkpoint without OOD statistics): when the
detector abstains there is no diagnosis and no triage, only dermaid.inference.RETAKE_MESSAGE, and the
probabilities are marked unreliable (probabilities_reliable false; the saliency PNG says it in headers).
Model work goes to the Classifier (serve/classifier.py) and the Explainer (serve/explainer.py) through
their handles. `serve.ingress(api)` freezes a copy of `api` (pickled with the functions its routes call)
where the class is declared: every helper, middleware, handler and router is defined above the class.
"""

import asyncio
import base64
import logging
from typing import Any

from fastapi import FastAPI, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from dermaid import __version__
from dermaid.classes import BY_CODE, DISCLAIMER
from dermaid.inference import RETAKE_MESSAGE, build_result
from dermaid.ray_compat import by_value_handle
from serve.args import MIB, AppArgs, IngressArgs, deployment_options
from serve.errors import ApiError, ErrorResponse, add_error_handling, error_body
from serve.review import create_review_context
from serve.review import router as review_router
from serve.schemas import (
    ERROR_RESPONSES, Age, ClassifyResponse, Consent, ImageFile, Method, ModelResponse, SaliencyFormat, SaliencyResponse,
    Sex, Site, Target, only_fields,
)

logger = logging.getLogger("ray.serve")

SALIENCY_JSON_KEYS = ("target", "probability", "method", "layer", "width", "height", "model_version")
CALIBRATE_HOW = "run `dermaid calibrate checkpoint=...` on the served checkpoint, then redeploy"


def _replica_upload_limit() -> int:
    """The serving Ingress replica's limit (config: max_upload_mb); AppArgs' default outside a replica."""
    try:
        return int(serve.get_replica_context().servable_object.max_upload_bytes)
    except Exception:  # noqa: BLE001 - not inside a replica (or not initialised yet)
        return int(AppArgs.model_fields["max_upload_mb"].default * MIB)


async def _read_image(upload: UploadFile) -> bytes:
    data = await upload.read()
    if not data:
        raise ApiError(400, "empty_image", "the image is empty")
    return data


def _grpc_handle(handle: DeploymentHandle) -> DeploymentHandle | None:
    """The same deployment called over Serve's gRPC transport; None where this Ray has no such option."""
    grpc = by_value_handle(handle)
    if grpc is None:
        logger.warning("this Ray Serve has no gRPC handle transport; the Ingress uses actor calls")
    return grpc


def _ood_fields(out: dict[str, Any]) -> dict[str, Any]:
    """The classifier's OOD decision as response fields: ood_score, abstain (null / null without a detector),
    probabilities_reliable (false when abstained) and message (RETAKE_MESSAGE when abstained, else null)."""
    return {"ood_score": out["ood_score"], "abstain": out["abstain"], "probabilities_reliable": not out["abstain"],
            "message": RETAKE_MESSAGE if out["abstain"] else None}


def _header_value(value: Any) -> str:
    """JSON spelling in a header: null, true / false, or the number."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:.6f}"


def _saliency_png(out: dict[str, Any], ood: dict[str, Any]) -> Response:
    """The overlay itself; what it shows (and whether the model abstained) in headers."""
    return Response(out["png"], media_type="image/png",
                    headers={"X-DermAID-Target": out["target"],
                             "X-DermAID-Probability": f"{out['probability']:.6f}",
                             "X-DermAID-OOD-Score": _header_value(ood["ood_score"]),
                             "X-DermAID-Abstain": _header_value(ood["abstain"]),
                             "X-DermAID-Disclaimer": DISCLAIMER})


def _saliency_json(out: dict[str, Any], ood: dict[str, Any]) -> JSONResponse:
    """The class, its probability and the overlay as base64 PNG, with the OOD decision."""
    body = {key: out[key] for key in SALIENCY_JSON_KEYS}
    body.update(name=BY_CODE[out["target"]].name, overlay_png_base64=base64.b64encode(out["png"]).decode(),
                **ood, disclaimer=DISCLAIMER)
    return JSONResponse(body)


def _model_body(info: dict[str, Any]) -> dict[str, Any]:
    """/v1/model: the card, whether the OOD detector is there (or how to add it), the triage operating point."""
    card = info["card"]
    block = card.get("ood")
    ood = ({"method": block["method"], "threshold": block["threshold"], "refuse_share": block["refuse_share"]}
           if block else {"missing": True, "how": CALIBRATE_HOW})
    return {**info, "ood": ood, "triage": card.get("triage"), "disclaimer": DISCLAIMER}


api = FastAPI(
    title="DermAID",
    version=__version__,
    description="Skin-lesion classification for research. " + DISCLAIMER,
)
add_error_handling(api, max_bytes=_replica_upload_limit)
api.include_router(review_router)  # GET / and /review (pages), /v1/review/... (serve/review.py)


@serve.deployment(name="Ingress", **deployment_options(IngressArgs()))
@serve.ingress(api)
class Ingress:
    """HTTP routes: validation and limits here; model work in Classifier and Explainer; uploads store.

    settings: max_upload_mb, malignant_codes, triage, storage ({url, db_url}), grpc_max_upload_mb and
    review (serve/review.py review_settings), as build_app passes them."""

    def __init__(self, classifier: DeploymentHandle, explainer: DeploymentHandle, settings: dict[str, Any]) -> None:
        from dermaid.uploads.store import UploadStore, database_url

        self.classifier = classifier
        self.explainer = explainer
        self.grpc_max_upload_bytes = int(float(settings["grpc_max_upload_mb"]) * MIB)
        self.classifier_grpc = _grpc_handle(classifier) if self.grpc_max_upload_bytes > 0 else None
        self.max_upload_bytes = int(float(settings["max_upload_mb"]) * MIB)
        self.malignant_codes = list(settings["malignant_codes"])
        self.triage = dict(settings["triage"])
        storage_url = settings["storage"]["url"]
        # the schema was migrated once by build_app; UploadStore only checks it (dermaid.uploads.schema)
        self.store = UploadStore(storage_url, database_url(storage_url, settings["storage"]["db_url"]))
        self.review = create_review_context(self.store, settings["review"])  # used by serve/review.py
        self._model: dict[str, Any] | None = None

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The ingress is up (not necessarily the model: see /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Ready once the classifier and the explainer have loaded their models."""
        try:
            info = await asyncio.wait_for(self.classifier.info.remote(), timeout=5.0)
            await asyncio.wait_for(self.explainer.info.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse(error_body("not_ready", f"model not loaded yet ({type(exc).__name__})"),
                                status_code=503)
        return JSONResponse({"status": "ready", "model_version": info["model_version"]})

    @api.get("/v1/model", response_model=ModelResponse)
    async def model(self) -> JSONResponse:
        """The model card of the served checkpoint (classes, input, metadata, metrics, calibration), whether its
        OOD detector is present (else how to add it) and its validation-chosen triage operating point."""
        if self._model is None:
            self._model = _model_body(await self.classifier.info.remote())
        return JSONResponse(self._model)

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
              dependencies=[only_fields("image", "age", "sex", "site", "consent")])
    async def classify(self, image: ImageFile, age: Age = None, sex: Sex = None, site: Site = None,
                       consent: Consent = False) -> JSONResponse:
        """Class probabilities, malignancy score and triage message for one image. Decision support only."""
        data = await _read_image(image)
        out = await self._classify(data, age, sex, site, consent)
        if "error" in out:
            raise ApiError(**out["error"])
        result = build_result(out["probabilities"], self.malignant_codes, self.triage,
                              operating_point=out["operating_point"], ood_score=out["ood_score"],
                              abstain=out["abstain"])
        upload_id = None
        if consent:
            upload_id = await run_in_threadpool(self._store, data, out, age, sex, site, result["malignancy_score"])
        return JSONResponse({"upload_id": upload_id, "stored": upload_id is not None,
                             "model_version": out["model_version"], **_ood_fields(out), **result})

    @api.post("/v1/saliency", responses={200: {"model": SaliencyResponse, "content": {"image/png": {}}},
                                         **ERROR_RESPONSES},
              dependencies=[only_fields("image", "age", "sex", "site", "target", "method", "format")])
    async def saliency(self, image: ImageFile, age: Age = None, sex: Sex = None, site: Site = None,
                       target: Target = None, method: Method = "gradcam",
                       format: SaliencyFormat = "png") -> Response:  # noqa: A002 - the form field's name
        """A Grad-CAM overlay at the input image's size (PNG), or JSON with the class and base64 PNG; both say
        whether the model abstained on the image (the classifier's OOD decision)."""
        data = await _read_image(image)
        out, decision = await asyncio.gather(self.explainer.explain.remote(data, age, sex, site, target, method),
                                             self._classify(data, age, sex, site, False))
        for answer in (out, decision):
            if "error" in answer:
                raise ApiError(**answer["error"])
        ood = _ood_fields(decision)
        return _saliency_png(out, ood) if format == "png" else _saliency_json(out, ood)

    async def _classify(self, data: bytes, age: Any, sex: Any, site: Any, return_input: bool) -> dict[str, Any]:
        """The Classifier's answer (serve/classifier.py), over gRPC for uploads up to grpc_max_upload_mb."""
        small = self.classifier_grpc is not None and len(data) <= self.grpc_max_upload_bytes
        return await (self.classifier_grpc if small else self.classifier).classify.remote(
            data, age, sex, site, return_input)

    def _store(self, data: bytes, out: dict, age: Any, sex: Any, site: Any, score: float | None) -> str | None:
        try:
            return self.store.save(image=data, model_input_png=out["input_png"], probabilities=out["probabilities"],
                                   model_version=out["model_version"], age=age, sex=sex, site=site,
                                   width=out["width"], height=out["height"], malignancy_score=score,
                                   ood={"ood_score": out["ood_score"], "abstain": out["abstain"]})
        except Exception:  # noqa: BLE001 - the prediction still goes back; nothing half-stored is counted
            logger.exception("storing a consented upload failed")
            return None
