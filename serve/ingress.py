"""The Ingress deployment: DermAID's FastAPI app (validation, limits, the uploads store) in front of the models.

Routes (OpenAPI at /openapi.json; Swagger UI at /docs only with ingress.docs: true, for development):
    POST /v1/classify   multipart: image, optional age (0-120), sex, site, consent (store for review)
    POST /v1/saliency   the same plus target (class code), method (gradcam, ...), format (png | json)
    GET  /v1/model      the card's public part (PUBLIC_CARD_KEYS, validation metrics, intended use), the OOD
                        detector (or how to add one), the triage operating point
    GET  /v1/review/model   the whole card (training config, paths, commit): dermatologist token only
    GET  /healthz       alive                 GET /readyz   model loaded (answered from the last model answer while
                        answers flow, so it stays cheap under overload)
    GET  /, /review     the consumer page and the dermatologist review page (serve/review.py, serve/web/)
    /v1/review/...      the dermatologist review API, bearer tokens (serve/review.py)
    GET, DELETE /v1/uploads/{ref}, GET /v1/privacy   a consumer's own upload with its lookup token (serve/uploads_api.py)

Overload and slowness are Serve's own limits, answered in the one JSON error shape (serve/errors.py): a model
deployment's queue full (max_queued_requests: Serve's BackPressureError at this replica's handle) or an answer not
ready within ingress.request_timeout_s -> 503 with Retry-After. Every classify answer names the model that made it:
model_version (the card's id) and registry_version ("NAME@VERSION" or null), also in the X-DermAID-Model-Version header.

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
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from dermaid import __version__
from dermaid.classes import BY_CODE, DISCLAIMER
from dermaid.inference import RETAKE_MESSAGE, build_result
from dermaid.ray_compat import by_value_handle
from serve.args import MIB, AppArgs, IngressArgs, deployment_options
from serve.errors import NO_STORE, ApiError, ErrorResponse, add_error_handling, error_body, guarded
from serve.metrics import RequestMetrics, ServeMonitor, timed
from serve.quotas import RequestLimit, RequestLimitMiddleware, UploadGuard
from serve.review import create_review_context, require_reviewer, servable_attribute
from serve.review import router as review_router
from serve.schemas import (
    ERROR_RESPONSES, Age, ClassifyResponse, Consent, FullSize, ImageFile, Method, ModelResponse, SaliencyFormat,
    SaliencyResponse, Sex, Site, Target, only_fields,
)
from serve.uploads_api import consent_fields, create_consumer_context
from serve.uploads_api import router as uploads_router

logger = logging.getLogger("ray.serve")

READY_FRESH_S = 10.0  # /readyz trusts a classifier answer this recent instead of asking the classifier again
SALIENCY_JSON_KEYS = ("target", "probability", "method", "layer", "width", "height", "model_version",
                      "registry_version")
CALIBRATE_HOW = "run `dermaid calibrate checkpoint=...` on the served checkpoint, then redeploy"
# What /v1/model shows of the card: what a client needs to use the model and judge it. The rest (training config
# with its paths and bucket URLs, compression source, code commit, OOD statistics) is on /v1/review/model.
PUBLIC_CARD_KEYS = ("format_version", "kind", "classes", "input", "metadata", "calibration")
INTENDED_USE = ("Research decision support: a photo of one skin lesion (dermoscopic or phone), with optional age, "
                "sex and body site, -> probabilities over the eight ISIC 2019 diagnoses, a malignancy score and a "
                "triage message. Not a diagnosis and not a medical device; not for images other than a skin "
                "lesion (those are refused when the card has an OOD detector).")


def _replica_upload_limit() -> int:
    """The serving Ingress replica's limit (config: max_upload_mb); AppArgs' default outside a replica."""
    limit = servable_attribute("max_upload_bytes")
    return int(AppArgs.model_fields["max_upload_mb"].default * MIB) if limit is None else int(limit)


async def _read_image(upload: UploadFile) -> bytes:
    data = await upload.read()
    if not data:
        raise ApiError(400, "empty_image", "the image is empty")
    return data


def _replica_setting(name: str, default: float) -> float:
    """A setting of the serving Ingress replica (request_timeout_s, retry_after_s); `default` outside a replica."""
    settings = servable_attribute("settings")
    return default if settings is None else float(settings[name])


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


def _model_headers(out: dict[str, Any]) -> dict[str, str]:
    """The model that made an answer, in a header: the registry's NAME@VERSION, else the card's id."""
    return {"X-DermAID-Model-Version": out.get("registry_version") or out["model_version"]}


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
                             "X-DermAID-Disclaimer": DISCLAIMER, **_model_headers(out)})


def _saliency_json(out: dict[str, Any], ood: dict[str, Any]) -> JSONResponse:
    """The class, its probability and the overlay as base64 PNG, with the OOD decision."""
    body = {key: out.get(key) for key in SALIENCY_JSON_KEYS}  # registry_version: None for a plain checkpoint
    body.update(name=BY_CODE[out["target"]].name, overlay_png_base64=base64.b64encode(out["png"]).decode(),
                **ood, disclaimer=DISCLAIMER)
    return JSONResponse(body)


def _public_card(card: dict[str, Any]) -> dict[str, Any]:
    """The card's public part: PUBLIC_CARD_KEYS, the backbone's name, the validation metrics, the intended use."""
    metrics = {key: value for key, value in (card.get("metrics") or {}).items()
               if key == "val" or key.startswith("val/")}  # validation only: no run ids, timings, learning rates
    return {**{key: card[key] for key in PUBLIC_CARD_KEYS if key in card},
            "architecture": (card.get("model") or {}).get("name"), "metrics": metrics, "intended_use": INTENDED_USE}


def _model_body(info: dict[str, Any]) -> dict[str, Any]:
    """/v1/model: the card's public part, whether the OOD detector is there (or how to add it), the triage
    operating point."""
    card = info["card"]
    block = card.get("ood")
    ood = ({"method": block["method"], "threshold": block["threshold"], "refuse_share": block["refuse_share"]}
           if block else {"missing": True, "how": CALIBRATE_HOW})
    return {"model_version": info["model_version"], "card": _public_card(card), "ood": ood,
            "triage": card.get("triage"), "disclaimer": DISCLAIMER}


api = FastAPI(
    title="DermAID",
    version=__version__,
    description="Skin-lesion classification for research. " + DISCLAIMER,
    docs_url=None,   # the Ingress serves /docs itself, only when ingress.docs is on (serve/args.py IngressArgs)
    redoc_url=None,
)
add_error_handling(api, max_bytes=_replica_upload_limit,
                   deadline_s=lambda: _replica_setting("request_timeout_s", IngressArgs().request_timeout_s),
                   retry_after_s=lambda: int(_replica_setting("retry_after_s", IngressArgs().retry_after_s)))
api.add_middleware(RequestLimitMiddleware, limit=lambda: servable_attribute("request_limit"))  # before the body is read
api.add_middleware(RequestMetrics)  # dermaid_requests_total{route, status} (serve/metrics.py), outermost: every answer
api.include_router(review_router)  # GET / and /review (pages), /v1/review/... (serve/review.py)
api.include_router(uploads_router)  # /v1/uploads/{ref} (a consumer's lookup, deletion), /v1/privacy (serve/uploads_api.py)


@serve.deployment(name="Ingress", **deployment_options(IngressArgs()))
@serve.ingress(api)
class Ingress:
    """HTTP routes: validation and limits here; model work in Classifier and Explainer; uploads store.

    settings: max_upload_mb, malignant_codes, triage, storage (StorageArgs: url, db_url, the upload limits),
    grpc_max_upload_mb and review (serve/review.py review_settings), as build_app passes them."""

    def __init__(self, classifier: DeploymentHandle, explainer: DeploymentHandle, settings: dict[str, Any]) -> None:
        from dermaid.uploads.store import UploadStore, database_url

        self.classifier = classifier
        self.explainer = explainer
        self.settings = {"request_timeout_s": float(settings.get("request_timeout_s", IngressArgs().request_timeout_s)),
                         "retry_after_s": int(settings.get("retry_after_s", IngressArgs().retry_after_s))}
        self._answered: tuple[float, dict[str, Any]] | None = None  # (monotonic, model names) of the last model answer
        self._explainer_ready = False
        self.grpc_max_upload_bytes = int(float(settings["grpc_max_upload_mb"]) * MIB)
        self.classifier_grpc = _grpc_handle(classifier) if self.grpc_max_upload_bytes > 0 else None
        self.max_upload_bytes = int(float(settings["max_upload_mb"]) * MIB)
        self.malignant_codes = list(settings["malignant_codes"])
        self.triage = dict(settings["triage"])
        storage_url = settings["storage"]["url"]
        # the schema was migrated once by build_app; UploadStore only checks it (dermaid.uploads.schema)
        self.store = UploadStore(storage_url, database_url(storage_url, settings["storage"]["db_url"]))
        self.guard = UploadGuard(settings["storage"], self.store)  # what the public may store (serve/quotas.py)
        per_minute = settings.get("requests_per_client_per_minute")  # what one client may send (serve/quotas.py)
        self.request_limit = RequestLimit(per_minute, settings["storage"]["trusted_proxies"]) if per_minute else None
        self.review = create_review_context(self.store, settings["review"])  # used by serve/review.py
        self.consumer = create_consumer_context(self.store, settings["storage"])  # used by serve/uploads_api.py
        self.docs = False  # ingress.docs, set by reconfigure (the deployment's user_config)
        self.monitor = ServeMonitor(settings.get("monitoring"))  # metrics + the image-free prediction log (serve/metrics.py)
        self._info: dict[str, Any] | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """IngressArgs.user_config(): whether /docs serves Swagger UI."""
        self.docs = bool(user_config.get("docs", False))

    def __del__(self) -> None:
        """Serve's graceful shutdown of the replica: the prediction log's pending rows are written first."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.close()

    @api.get("/docs", include_in_schema=False)
    async def docs_page(self, request: Request) -> HTMLResponse:
        """Swagger UI (FastAPI's page: its script comes from a CDN), only with ingress.docs on."""
        if not self.docs:
            raise HTTPException(404, "Swagger UI is off on this server (ingress.docs); the schema is /openapi.json")
        root = (request.scope.get("root_path") or "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{api.title} - Swagger UI")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """The ingress is up (not necessarily the model: see /readyz)."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Ready once the classifier and the explainer have loaded their models. While the classifier answers (one
        in the last READY_FRESH_S seconds) this is answered from that, without a call: under overload the model's
        queue is full and a probe behind it would say "not ready" about a replica that is serving."""
        recent = self._answered
        if recent is None or time.monotonic() - recent[0] > READY_FRESH_S or not self._explainer_ready:
            try:
                info = await asyncio.wait_for(self.classifier.info.remote(), timeout=5.0)
                if not self._explainer_ready:
                    await asyncio.wait_for(self.explainer.info.remote(), timeout=5.0)
                    self._explainer_ready = True
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                return JSONResponse(error_body("not_ready", f"model not loaded yet ({type(exc).__name__})"),
                                    status_code=503)
            recent = self._remember(info)
        return JSONResponse({"status": "ready", **recent[1]})

    def _remember(self, answer: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Note a model answer (classify or info): readiness, and /v1/model's card is asked again after a switch."""
        names = {"model_version": answer["model_version"], "registry_version": answer.get("registry_version")}
        if self._info is not None and {k: self._info.get(k) for k in names} != names:
            self._info = None
        self._answered = (time.monotonic(), names)
        return self._answered

    @api.get("/v1/model", response_model=ModelResponse)
    async def model(self) -> JSONResponse:
        """The public part of the served checkpoint's card (classes, input, metadata, validation metrics,
        calibration, intended use), whether its OOD detector is present (else how to add it) and its
        validation-chosen triage operating point."""
        return JSONResponse(_model_body(await self._model_info()))

    @api.get("/v1/review/model", tags=["review"], dependencies=[Depends(require_reviewer)],
             responses={401: {"description": "no token"}, 403: {"description": "not a dermatologist token"}})
    async def review_model(self) -> JSONResponse:
        """The whole card of the served checkpoint (training config, provenance, compression source, OOD
        statistics), for dermatologists and operators."""
        return JSONResponse({**await self._model_info(), "disclaimer": DISCLAIMER}, headers=NO_STORE)

    async def _model_info(self) -> dict[str, Any]:
        """The Classifier's {model_version, card}, asked once."""
        if self._info is None:
            self._info = await self.classifier.info.remote()
        return self._info

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES,
              dependencies=[only_fields("image", "age", "sex", "site", "consent")])
    async def classify(self, request: Request, image: ImageFile, age: Age = None, sex: Sex = None,
                       site: Site = None, consent: Consent = False) -> JSONResponse:
        """Class probabilities, malignancy score and triage message for one image. Decision support only.

        consent=true also stores the photo for dermatologist review, within what the public may store
        (serve/quotas.py): past the client's hourly limit or today's storage quota the whole request is refused
        with 429 and Retry-After before the model runs (the message says to try later or classify without
        consent), so no answer shows a result its sender believes stored. The photo is stored without its
        metadata (EXIF, GPS, ...) and the answer carries its reference (upload_id) and a secret lookup_token, once:
        GET / DELETE /v1/uploads/{upload_id} (serve/uploads_api.py). The same photo stored before is not stored
        again: stored true, duplicate true, no reference and no token (the earlier upload's are not this sender's)."""
        started = time.perf_counter()
        data = await _read_image(image)
        if consent:
            self.guard.admit(request)
            await run_in_threadpool(self.guard.check_quota, len(data))
        out = await self._classify(data, age, sex, site, consent)
        if "error" in out:
            raise ApiError(**out["error"])
        result = build_result(out["probabilities"], self.malignant_codes, self.triage,
                              operating_point=out["operating_point"], ood_score=out["ood_score"],
                              abstain=out["abstain"])
        saved = None
        if consent:
            saved = await run_in_threadpool(self._store, data, out, age, sex, site, result["malignancy_score"])
        self.monitor.observe("/v1/classify", out, result, age, sex, site, consent, started)  # never raises
        return JSONResponse({**consent_fields(saved, consent),
                             "model_version": out["model_version"], "registry_version": out.get("registry_version"),
                             **_ood_fields(out), **result},
                            headers={**_model_headers(out), **(NO_STORE if consent else {})})  # a lookup token is in no cache

    @api.post("/v1/saliency", responses={200: {"model": SaliencyResponse, "content": {"image/png": {}}},
                                         **ERROR_RESPONSES},
              dependencies=[only_fields("image", "age", "sex", "site", "target", "method", "format", "full_size")])
    async def saliency(self, image: ImageFile, age: Age = None, sex: Sex = None, site: Site = None,
                       target: Target = None, method: Method = "gradcam", full_size: FullSize = False,
                       format: SaliencyFormat = "png") -> Response:  # noqa: A002 - the form field's name
        """A Grad-CAM overlay (PNG): the upload scaled to at most overlay_max_side px on its long side, or at its own
        size with full_size; or JSON with the class and base64 PNG. Both say whether the model abstained on the image
        (the classifier's OOD decision). Images over saliency_max_pixels: 413 image_too_large."""
        started = time.perf_counter()
        data = await _read_image(image)
        (out, saliency_ms), decision = await asyncio.gather(
            timed(guarded(self.explainer.explain.remote(data, age, sex, site, target, method, full_size),
                          self.settings["retry_after_s"])),
            self._classify(data, age, sex, site, False))
        for answer in (out, decision):
            if "error" in answer:
                raise ApiError(**answer["error"])
        self.monitor.observe("/v1/saliency", decision, None, age, sex, site, False, started, saliency_ms)
        ood = _ood_fields(decision)
        return _saliency_png(out, ood) if format == "png" else _saliency_json(out, ood)

    async def _classify(self, data: bytes, age: Any, sex: Any, site: Any, return_input: bool) -> dict[str, Any]:
        """The Classifier's answer (serve/classifier.py), over gRPC for uploads up to grpc_max_upload_mb."""
        small = self.classifier_grpc is not None and len(data) <= self.grpc_max_upload_bytes
        out = await guarded((self.classifier_grpc if small else self.classifier).classify.remote(
            data, age, sex, site, return_input), self.settings["retry_after_s"])
        if "error" not in out:
            self._remember(out)
        return out

    def _store(self, data: bytes, out: dict, age: Any, sex: Any, site: Any, score: float | None) -> Any:
        """The upload stored, its photo cleaned of metadata (UploadStore.save_with_token -> SavedUpload), or None."""
        try:
            return self.store.save_with_token(
                image=data, model_input_png=out["input_png"], probabilities=out["probabilities"],
                model_version=out["model_version"], age=age, sex=sex, site=site, malignancy_score=score,
                ood={"ood_score": out["ood_score"], "abstain": out["abstain"]})
        except Exception:  # noqa: BLE001 - the prediction still goes back; nothing half-stored is counted
            logger.exception("storing a consented upload failed")
            return None
