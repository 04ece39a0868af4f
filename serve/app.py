"""DermAID on Ray Serve: a classifier and an explainer deployment behind one FastAPI ingress.

    dermaid serve checkpoint=runs/toy/best                  # local Ray, http://127.0.0.1:8000 (conf/serve.yaml)
    serve run serve/config.yaml                             # any Ray cluster; app args in the file
    serve run serve.app:build_app checkpoint=/abs/ckpt      # quick try with default args
    serve deploy serve/config.yaml                          # a running cluster (or a KubeRay RayService)

Routes (OpenAPI at /docs):
    POST /v1/classify   multipart: image, optional age (0-120), sex, site, consent (store for review)
    POST /v1/saliency   the same plus target (class code), method (gradcam, ...), format (png | json)
    GET  /v1/model      the model card        GET /healthz   alive        GET /readyz   model loaded
    GET  /, /review     the consumer page and the dermatologist review page (serve/review.py, serve/web/)
    /v1/review/...      the dermatologist review API, bearer tokens (serve/review.py: queue, labels, Label Studio)

Deployments: `Classifier` (dermaid.inference.Predictor; decoding in a thread pool, `@serve.batch`
dynamic batching tuned through user_config), `Explainer` (Grad-CAM; one model copy per concurrent
call), `Ingress` (FastAPI: validation, limits, the uploads store). `build_app(AppArgs)` composes them.
Nothing runs at import time: the module only declares classes; models load in replica __init__.

Every error is JSON {"error": {"code": ..., "message": ...}} with a 4xx status for client input.
Outputs are decision support, never a diagnosis (the disclaimer is in every result).
"""

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dermaid import __version__
from dermaid.classes import AGE_RANGE, CLASS_CODES, DISCLAIMER, MALIGNANT_CODES, SEXES, SITES
from dermaid.data.images import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, ImageTooLargeError, sniff_format
from dermaid.errors import DermaidError
from dermaid.inference import CAM_METHODS, DEFAULT_TRIAGE, ImageShapeError, build_result, saliency_png
from dermaid.files import absolute_url
from dermaid.ray_compat import by_value_handle
from serve.review import ReviewArgs, create_review_context, review_settings
from serve.review import router as review_router

logger = logging.getLogger("ray.serve")

MIB = 1024 * 1024
# Serve's inter-deployment gRPC carries messages up to 4 MiB (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH);
# a classify call is the upload plus under 1 KiB of arguments, its answer under 200 KiB
GRPC_UPLOAD_LIMIT_MB = 3.5
DATABASE_URL_ENV = "DERMAID_DATABASE_URL"  # the uploads database when storage.db_url is not given


# --- typed application arguments (serve/config.yaml `args`, conf/serve.yaml) ---------------------------

class DeploymentArgs(BaseModel):
    """Replicas and resources of one deployment."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = None   # Serve's AutoscalingConfig; replaces num_replicas
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32


class TorchDeploymentArgs(DeploymentArgs):
    """A deployment that runs torch: its intra-op threads and how they wait between parallel regions."""

    torch_threads: int = 2
    # None: OpenMP's default, spin briefly at a barrier and then sleep: spinning speed inside a forward, no
    # threads left spinning between requests, and no runtime_env (Ray's prestarted workers fit). PASSIVE
    # sleeps at once (+10 ms per batch-1 forward on 2 cores); ACTIVE spins forever and starves the
    # ingress and the other forward lane on shared cores.
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = None


DEFAULT_MAX_BATCH_SIZE = 8  # the classifier's dynamic batching (user_config), until reconfigure() sets it
# Serve's batcher forms the next batch while earlier ones run, so a wait only delays a lone request; on
# CPU a batch of 1 costs no more per image than a batch of 8. Give it a few ms on a GPU.
DEFAULT_BATCH_WAIT_S = 0.0
MAX_FORWARD_LANES = 4  # @serve.batch's max_concurrent_batches; forward_lanes (<= this) threads run them


class ClassifierArgs(TorchDeploymentArgs):
    decode_threads: int = 2
    # Batches that run at once (ForwardLanes): one alone gets every torch thread (lowest latency); beside
    # it, others run single-threaded. On CPU, two 1-thread forwards of a small CNN do ~1.3x the work of one
    # 2-thread forward (less synchronisation per op). 1 on a GPU.
    forward_lanes: int = Field(2, ge=1, le=MAX_FORWARD_LANES)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S


class ExplainerArgs(TorchDeploymentArgs):
    num_cpus: float = 0.5
    concurrency: int = 1          # model copies, i.e. concurrent Grad-CAM calls per replica
    max_ongoing_requests: int = 8


class IngressArgs(DeploymentArgs):
    num_cpus: float = 0.25
    max_ongoing_requests: int = 128
    # Uploads up to this size reach the Classifier over Serve's inter-deployment gRPC: one unary call,
    # where a Ray actor call is a streaming one (an acknowledgement, then the answer), ~3 ms more per
    # request on 2 cores. Larger uploads and saliency (a PNG at the input's size) use actor calls; 0: only those.
    grpc_max_upload_mb: float = Field(3.0, ge=0, le=GRPC_UPLOAD_LIMIT_MB)


class StorageArgs(BaseModel):
    """Where consented uploads go. db_url None: $DERMAID_DATABASE_URL (read in the replica, so a password
    never sits in the app's arguments), else a SQLite file under a local `url`."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field("uploads", min_length=1)  # fsspec URL of the blobs (local dir, gs://bucket/prefix)
    db_url: str | None = None     # SQLAlchemy URL (PostgreSQL in deployment)


class AppArgs(BaseModel):
    """Arguments of `build_app` (validated by Serve from a config file's `args` or from the CLI)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    explainer_checkpoint: str | None = None
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    malignant_codes: list[str] = Field(default_factory=lambda: list(MALIGNANT_CODES))
    triage: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TRIAGE))
    storage: StorageArgs = Field(default_factory=StorageArgs)
    review: ReviewArgs = Field(default_factory=ReviewArgs)   # dermatologist tokens (hashes) for /review
    classifier: ClassifierArgs = Field(default_factory=ClassifierArgs)
    explainer: ExplainerArgs = Field(default_factory=ExplainerArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)

    @field_validator("checkpoint", "explainer_checkpoint")
    @classmethod
    def _absolute_checkpoint(cls, value: str | None) -> str | None:
        return absolute_url(value) if value else value

    @field_validator("malignant_codes")
    @classmethod
    def _known_codes(cls, value: list[str]) -> list[str]:
        unknown = [code for code in value if code not in CLASS_CODES]
        if unknown:
            raise ValueError(f"unknown class codes {unknown}; allowed: {list(CLASS_CODES)}")
        return value

    @field_validator("triage")
    @classmethod
    def _triage_levels(cls, value: dict[str, float]) -> dict[str, float]:
        merged = {**DEFAULT_TRIAGE, **value}
        if set(merged) != set(DEFAULT_TRIAGE) or not 0 <= merged["moderate"] <= merged["high"] <= 1:
            raise ValueError(f"triage needs 0 <= moderate <= high <= 1 (keys {sorted(DEFAULT_TRIAGE)}); got {value}")
        return merged

    @model_validator(mode="after")
    def _absolute_storage(self) -> "AppArgs":
        # Replicas may run in another working directory: pin local paths at build time.
        self.storage.url = absolute_url(self.storage.url)
        return self


# --- errors ------------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A client-facing error: rendered as {"error": {"code", "message"}} with `status`."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields


class BodyTooLarge(HTTPException):
    """Raised from the body stream once more than the limit has arrived (FastAPI re-raises HTTPExceptions)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit / MIB:g} MiB limit")


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "body_too_large",
                 415: "unsupported_media_type", 422: "invalid_field", 500: "internal", 503: "unavailable"}

# What each form field accepts (named in 422 messages).
ALLOWED_VALUES: dict[str, str] = {
    "image": "an image file in the multipart field 'image' (JPEG, PNG, WebP, GIF, BMP, TIFF)",
    "age": f"a number from {AGE_RANGE[0]} to {AGE_RANGE[1]}",
    "sex": ", ".join(SEXES),
    "site": ", ".join(SITES),
    "consent": "true or false",
    "target": ", ".join(CLASS_CODES),
    "method": ", ".join(CAM_METHODS),
    "format": "png, json",
}


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def describe_image_error(exc: Exception, data: bytes) -> dict[str, Any]:
    """A decoding failure -> {"status", "code", "message"}: 413 too large, 415 not an allowed image, else 400."""
    message = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return {"status": 413, "code": "image_too_large", "message": message}
    if not data:
        return {"status": 400, "code": "empty_image", "message": "the image is empty"}
    if isinstance(exc, ImageShapeError):
        return {"status": 400, "code": "invalid_image", "message": message}
    if sniff_format(data) not in ALLOWED_FORMATS:
        return {"status": 415, "code": "unsupported_media_type",
                "message": f"{message}; send {ALLOWED_VALUES['image']}"}
    return {"status": 400, "code": "undecodable_image", "message": message}


# --- deployments -------------------------------------------------------------------------------------------

class ForwardLanes:
    """Up to `lanes` forwards at once, each on its own thread. Lane 0 owns the replica's one OpenMP team:
    a forward there gets torch_threads // running threads, so all of them when it runs alone. The other
    lanes run single-threaded forwards and take work only while lane 0 is busy.

    One team per process: libgomp counts the threads of every team in the process, and once they
    outnumber the CPUs it stops spinning at barriers and sleeps at each one (~200 sleeps and +6 ms per
    batch-1 efficientnet_b0 forward on 2 cores). torch.set_num_threads sizes the calling thread's team
    only, so lanes do not change each other's, and the thread that builds the team (warmup) is lane 0."""

    def __init__(self, forward: Callable[..., Any], lanes: int, torch_threads: int) -> None:
        self._forward = forward
        self._threads = max(1, int(torch_threads))
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix=f"forward{i}") for i in range(max(1, int(lanes)))]
        self._busy = [False] * len(self._lanes)
        self._free: asyncio.Semaphore | None = None  # made on the event loop that runs the forwards

    def warmup(self, warm: Callable[[], Any]) -> Any:
        """Run `warm` (a first forward) on lane 0 with every thread: its OpenMP team is made there."""
        return self._lanes[0].submit(self._on_lane, self._threads, warm).result()

    async def run(self, *args: Any) -> Any:
        if self._free is None:
            self._free = asyncio.Semaphore(len(self._lanes))
        async with self._free:
            lane = self._busy.index(False)  # lane 0 whenever it is free; the semaphore leaves one free
            self._busy[lane] = True
            threads = max(1, self._threads // sum(self._busy)) if lane == 0 else 1
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._lanes[lane], self._on_lane, threads, self._forward, *args)
            finally:
                self._busy[lane] = False

    @staticmethod
    def _on_lane(threads: int, fn: Callable[..., Any], *args: Any) -> Any:
        from dermaid.inference import set_thread_torch_threads

        set_thread_torch_threads(threads)
        return fn(*args)


@serve.deployment(name="Classifier", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1.0})
class Classifier:
    """Predictor behind dynamic batching. Decoding runs in a thread pool; batches run on `forward_lanes`
    threads that share the torch thread budget (ForwardLanes), so the next images decode while batches
    run. user_config: max_batch_size, batch_wait_timeout_s."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                 torch_threads: int = 2, decode_threads: int = 2, forward_lanes: int = 2) -> None:
        from dermaid.inference import Predictor, set_thread_torch_threads

        set_thread_torch_threads(1)  # no OpenMP team on this thread: the forward lanes own the replica's (ForwardLanes)
        self.predictor = Predictor(checkpoint, device=device, max_pixels=max_pixels)
        # one torch thread each, so no team: the small preprocessing ops gain nothing from one
        self._decode_pool = ThreadPoolExecutor(max(1, int(decode_threads)), thread_name_prefix="decode",
                                               initializer=set_thread_torch_threads, initargs=(1,))
        self._lanes = ForwardLanes(self._forward_batch, min(int(forward_lanes), MAX_FORWARD_LANES), torch_threads)
        self._lanes.warmup(self.predictor.warmup)
        _freeze_gc()
        logger.info("Classifier loaded %s (%s)", checkpoint, self.predictor.version)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.predict_batch.set_max_batch_size(int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self.predict_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)))

    def info(self) -> dict[str, Any]:
        return {"model_version": self.predictor.version, "card": self.predictor.card}

    async def classify(self, data: bytes, age: float | None = None, sex: str | None = None,
                       site: str | None = None, return_input: bool = False) -> dict[str, Any]:
        """-> {"probabilities": [8], "model_version", "width", "height", "input_png"?} or {"error": {...}}."""
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._decode_pool, self.predictor.prepare, data)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}
        metadata = self.predictor.encode_metadata(age, sex, site)  # (14,)
        probabilities = await self.predict_batch((prepared.tensor, metadata))
        out = {"probabilities": probabilities, "model_version": self.predictor.version,
               "width": prepared.image.width, "height": prepared.image.height}
        if return_input:
            out["input_png"] = await loop.run_in_executor(self._decode_pool, _png_bytes, prepared.model_input, 3)
        return out

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S,
                 max_concurrent_batches=MAX_FORWARD_LANES)
    async def predict_batch(self, items: list[tuple[Any, Any]]) -> list[list[float]]:
        return (await self._lanes.run(items)).tolist()

    def _forward_batch(self, items: list[tuple[Any, Any]]) -> Any:
        """On a forward lane (stacking there too: a big copy is a parallel op, and only lanes have teams)."""
        import torch

        images = torch.stack([image for image, _ in items])        # (B, 3, H, W)
        metadata = torch.stack([meta for _, meta in items])        # (B, 14)
        return self.predictor.forward(images, metadata)            # (B, 8)


@serve.deployment(name="Explainer", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.5})
class Explainer:
    """Grad-CAM overlays. Each concurrent call uses its own model copy and CAM object (see inference.Explainer)."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS,
                 torch_threads: int = 2, concurrency: int = 1) -> None:
        from dermaid.inference import Explainer as CamExplainer
        from dermaid.inference import Predictor, set_thread_torch_threads
        from dermaid.models.card import float_weights_for

        set_thread_torch_threads(1)  # OpenMP teams only on the CAM threads (ForwardLanes says why)
        weights = float_weights_for(checkpoint)  # a compressed classifier's float source: Grad-CAM needs gradients
        self.explainer = CamExplainer(Predictor(weights, device=device, max_pixels=max_pixels), concurrency)
        self._pool = ThreadPoolExecutor(max(1, int(concurrency)), thread_name_prefix="cam",
                                        initializer=set_thread_torch_threads, initargs=(torch_threads,))
        self._pool.submit(self.explainer.warmup).result()
        _freeze_gc()

    def info(self) -> dict[str, Any]:
        return {"model_version": self.explainer.predictor.version, "layer": self.explainer.target_name}

    async def explain(self, data: bytes, age: float | None = None, sex: str | None = None, site: str | None = None,
                      target: str | None = None, method: str = "gradcam") -> dict[str, Any]:
        """-> {"png", "target", "probability", "method", "layer", "width", "height", "model_version"} or {"error"}."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._explain, data, age, sex, site, target, method)
        except DermaidError as exc:
            return {"error": describe_image_error(exc, data)}

    def _explain(self, data: bytes, age: Any, sex: Any, site: Any, target: str | None, method: str) -> dict:
        saliency = self.explainer.explain(data, age, sex, site, target=target, method=method)
        return {
            "png": saliency_png(saliency, self.explainer.predictor.version, compress_level=1),
            "target": saliency.target,
            "probability": saliency.probability,
            "method": saliency.method,
            "layer": saliency.layer,
            "width": saliency.overlay.width,
            "height": saliency.overlay.height,
            "model_version": self.explainer.predictor.version,
        }


def _freeze_gc() -> None:
    """After loading a model: its many long-lived objects leave the collector's scans, so no request pays
    for a full collection walking them."""
    import gc

    gc.collect()
    gc.freeze()


def _png_bytes(image: Any, compress_level: int = 3) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# --- HTTP: the FastAPI ingress -----------------------------------------------------------------------------

class ClassProbability(BaseModel):
    code: str
    name: str
    probability: float


class Triage(BaseModel):
    level: Literal["low", "moderate", "high"]
    message: str


class ClassifyResponse(BaseModel):
    upload_id: str | None = Field(description="id of the stored upload (only with consent)")
    stored: bool
    model_version: str
    probabilities: list[ClassProbability] = Field(description="all 8 classes, most probable first")
    top: ClassProbability
    malignancy_score: float = Field(description="summed probability of the malignant classes")
    triage: Triage
    disclaimer: str


class SaliencyResponse(BaseModel):
    target: str
    name: str
    probability: float
    method: str
    layer: str
    width: int
    height: int
    model_version: str
    overlay_png_base64: str
    disclaimer: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 503)}

Age = Annotated[float | None, Form(ge=AGE_RANGE[0], le=AGE_RANGE[1], description="age in years")]
Sex = Annotated[Literal[SEXES] | None, Form(description="sex")]  # type: ignore[valid-type]
Site = Annotated[Literal[SITES] | None, Form(description="anatomical site (ISIC 2019)")]  # type: ignore[valid-type]
ImageFile = Annotated[UploadFile, File(description=ALLOWED_VALUES["image"] + "; the content decides the format")]


def _only_fields(*names: str) -> Any:
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

api = FastAPI(
    title="DermAID",
    version=__version__,
    description="Skin-lesion classification for research. " + DISCLAIMER,
)


class BodyLimitMiddleware:
    """Pure ASGI: 413 for a declared Content-Length over the limit (nothing read), and a receive stream
    that stops as soon as more than the limit has arrived (chunked bodies)."""

    def __init__(self, app: Any, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _send_json(send, 400, error_body("bad_request", "Content-Length is not a number"))
                return
            if int(declared) > limit:
                await _send_json(send, 413, error_body("body_too_large", BodyTooLarge(limit).detail))
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_json(send, 413, error_body("body_too_large", exc.detail))


async def _send_json(send: Callable, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _replica_upload_limit() -> int:
    """The serving Ingress replica's limit (config: max_upload_mb); the default outside a replica."""
    try:
        return int(serve.get_replica_context().servable_object.max_upload_bytes)
    except Exception:  # noqa: BLE001 - not inside a replica (or not initialised yet)
        return int(AppArgs.model_fields["max_upload_mb"].default * MIB)


api.add_middleware(BodyLimitMiddleware, max_bytes=_replica_upload_limit)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    extra = {"fields": exc.fields} if exc.fields else {}
    return JSONResponse(error_body(exc.code, exc.message, **extra), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "form")]
        field = loc[0] if loc else "request"
        got = err.get("input")
        message = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            message = "required"
        elif got is not None and not isinstance(got, (dict, list)):
            message += f" (got {str(got)[:80]!r})"
        fields.append({"field": field, "message": message, "allowed": ALLOWED_VALUES.get(field, "")})
    text = "; ".join(f"{f['field']}: {f['message']}" + (f"; allowed: {f['allowed']}" if f["allowed"] else "")
                     for f in fields)
    return JSONResponse(error_body("invalid_field", text or "invalid request", fields=fields), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error: %s", exc)
    return JSONResponse(error_body("internal", "internal server error"), status_code=500)


# Everything the routes use is defined above this class: serve.ingress freezes a copy of `api` here.
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


api.include_router(review_router)  # GET / and /review (pages), /v1/review/... (serve/review.py)


@serve.deployment(name="Ingress", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    """HTTP routes: validation and limits here; model work in Classifier and Explainer; uploads store."""

    def __init__(self, classifier: DeploymentHandle, explainer: DeploymentHandle, settings: dict[str, Any]) -> None:
        from dermaid.uploads.store import UploadStore

        self.classifier = classifier
        self.explainer = explainer
        self.grpc_max_upload_bytes = int(float(settings["grpc_max_upload_mb"]) * MIB)
        self.classifier_grpc = _grpc_handle(classifier) if self.grpc_max_upload_bytes > 0 else None
        self.max_upload_bytes = int(float(settings["max_upload_mb"]) * MIB)
        self.malignant_codes = list(settings["malignant_codes"])
        self.triage = dict(settings["triage"])
        db_url = settings["storage"]["db_url"] or os.environ.get(DATABASE_URL_ENV) or None
        self.store = UploadStore(settings["storage"]["url"], db_url)
        self.review = create_review_context(self.store, settings.get("review"))  # used by serve/review.py
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

    @api.get("/v1/model")
    async def model(self) -> JSONResponse:
        """The model card of the served checkpoint (classes, input, metadata, metrics, calibration)."""
        if self._model is None:
            self._model = await self.classifier.info.remote()
        return JSONResponse({**self._model, "disclaimer": DISCLAIMER})

    @api.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
              dependencies=[_only_fields("image", "age", "sex", "site", "consent")])
    async def classify(self, image: ImageFile, age: Age = None, sex: Sex = None, site: Site = None,
                       consent: Annotated[bool, Form(description="store the upload for dermatologist review")] = False,
                       ) -> JSONResponse:
        """Class probabilities, malignancy score and triage message for one image. Decision support only."""
        data = await _read_image(image)
        small = self.classifier_grpc is not None and len(data) <= self.grpc_max_upload_bytes
        out = await (self.classifier_grpc if small else self.classifier).classify.remote(data, age, sex, site, consent)
        if "error" in out:
            raise ApiError(**out["error"])
        result = build_result(out["probabilities"], self.malignant_codes, self.triage)
        upload_id = None
        if consent:
            upload_id = await run_in_threadpool(self._store, data, out, age, sex, site, result["malignancy_score"])
        return JSONResponse({"upload_id": upload_id, "stored": upload_id is not None,
                             "model_version": out["model_version"], **result})

    @api.post("/v1/saliency", responses={200: {"content": {"image/png": {}}}, **_ERRORS},
              dependencies=[_only_fields("image", "age", "sex", "site", "target", "method", "format")])
    async def saliency(self, image: ImageFile, age: Age = None, sex: Sex = None, site: Site = None,
                       target: Annotated[Literal[CLASS_CODES] | None, Form(description="class code; default: top class")] = None,  # type: ignore[valid-type]  # noqa: E501
                       method: Annotated[Literal[CAM_METHODS], Form(description="CAM method")] = "gradcam",  # type: ignore[valid-type]  # noqa: E501
                       format: Annotated[Literal["png", "json"], Form(description="png image or json with base64")] = "png",  # noqa: A002, E501
                       ) -> Response:
        """A Grad-CAM overlay at the input image's size (PNG), or JSON with the class and base64 PNG."""
        data = await _read_image(image)
        out = await self.explainer.explain.remote(data, age, sex, site, target, method)
        if "error" in out:
            raise ApiError(**out["error"])
        if format == "png":
            return Response(out["png"], media_type="image/png",
                            headers={"X-DermAID-Target": out["target"],
                                     "X-DermAID-Probability": f"{out['probability']:.6f}",
                                     "X-DermAID-Disclaimer": DISCLAIMER})
        import base64

        from dermaid.classes import BY_CODE

        body = {key: out[key] for key in ("target", "probability", "method", "layer", "width", "height", "model_version")}
        body.update(name=BY_CODE[out["target"]].name, overlay_png_base64=base64.b64encode(out["png"]).decode(),
                    disclaimer=DISCLAIMER)
        return JSONResponse(body)

    def _store(self, data: bytes, out: dict, age: Any, sex: Any, site: Any, score: float) -> str | None:
        try:
            return self.store.save(image=data, model_input_png=out["input_png"], probabilities=out["probabilities"],
                                   model_version=out["model_version"], age=age, sex=sex, site=site,
                                   width=out["width"], height=out["height"], malignancy_score=score)
        except Exception:  # noqa: BLE001 - the prediction still goes back; nothing half-stored is counted
            logger.exception("storing a consented upload failed")
            return None


# --- the application ---------------------------------------------------------------------------------------

def _options(spec: DeploymentArgs) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    }
    if isinstance(spec, TorchDeploymentArgs) and spec.omp_wait_policy:
        # read by the OpenMP runtime when the process loads it: only an env var set at process start works
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": spec.omp_wait_policy}}
    if spec.autoscaling_config:
        options["autoscaling_config"] = spec.autoscaling_config
    else:
        options["num_replicas"] = spec.num_replicas
    return options


def build_app(args: AppArgs) -> Application:
    """Compose Classifier + Explainer + Ingress (`serve run serve.app:build_app checkpoint=...`)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    c, e = args.classifier, args.explainer
    classifier = Classifier.options(
        **_options(c), user_config={"max_batch_size": c.max_batch_size, "batch_wait_timeout_s": c.batch_wait_timeout_s},
    ).bind(args.checkpoint, args.device, args.max_pixels, c.torch_threads, c.decode_threads, c.forward_lanes)
    explainer = Explainer.options(**_options(e)).bind(
        args.explainer_checkpoint or args.checkpoint, args.device, args.max_pixels, e.torch_threads, e.concurrency,
    )
    settings = {"max_upload_mb": args.max_upload_mb, "malignant_codes": args.malignant_codes,
                "grpc_max_upload_mb": args.ingress.grpc_max_upload_mb,
                "triage": args.triage, "storage": args.storage.model_dump(),
                "review": review_settings(args.review)}
    return Ingress.options(**_options(args.ingress)).bind(classifier, explainer, settings)
