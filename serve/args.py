"""The typed arguments of the Serve application: the one source of every Serve default.

`build_app(AppArgs)` (serve/app.py) takes these; Serve validates them from a config file's `args`
(serve/config.yaml, the RayService in cluster/kuberay/rayservice.yaml) and `dermaid serve` from
conf/serve.yaml (serve/launcher.py). Those files repeat the defaults for readers, and
tests/test_serve_config.py fails when one of them disagrees with a default here without being one
of the deliberate overrides it lists.

    AppArgs                       checkpoint, device, limits, triage, storage, review, and per deployment:
      ClassifierArgs              replicas, resources, torch threads, decode threads, forward lanes, batching
      ExplainerArgs               replicas, resources, torch threads, model copies, the model (user_config)
      IngressArgs                 replicas, resources, the gRPC upload limit, /docs on or off (user_config)
    deployment_options(args)      one deployment's arguments -> Serve's .options(...) keywords
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dermaid.auth import TOKENS_ENV
from dermaid.classes import CLASS_CODES, MALIGNANT_CODES
from dermaid.data.images import DEFAULT_MAX_PIXELS
from dermaid.files import absolute_url
from dermaid.inference import DEFAULT_TRIAGE
from dermaid.inference.saliency_spec import OVERLAY_MAX_SIDE
from dermaid.registry.store import SCHEME as REGISTRY_SCHEME
from serve.metrics import MonitoringArgs

MIB = 1024 * 1024
# Serve's inter-deployment gRPC carries messages up to 4 MiB (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH);
# a classify call is the upload plus under 1 KiB of arguments, its answer under 200 KiB
GRPC_UPLOAD_LIMIT_MB = 3.5
MAX_FORWARD_LANES = 4  # @serve.batch's max_concurrent_batches; forward_lanes (<= this) threads run them


class DeploymentArgs(BaseModel):
    """Replicas and resources of one deployment."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int | Literal["auto"] = 1
    autoscaling_config: dict[str, Any] | None = None   # Serve's AutoscalingConfig; replaces num_replicas
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32
    # Requests each caller (the Ingress's handle, Serve's proxy) queues for this deployment beyond its replicas'
    # max_ongoing_requests; past it the caller gets Serve's BackPressureError at once (-1: Serve's default, no bound)
    max_queued_requests: int = Field(-1, ge=-1)


class TorchDeploymentArgs(DeploymentArgs):
    """A deployment that runs torch: its intra-op threads and how they wait between parallel regions."""

    torch_threads: int = 2
    # None: OpenMP's default, spin briefly at a barrier and then sleep: spinning speed inside a forward, no
    # threads left spinning between requests, and no runtime_env (Ray's prestarted workers fit). PASSIVE
    # sleeps at once (+10 ms per batch-1 forward on 2 cores); ACTIVE spins forever and starves the
    # ingress and the other forward lane on shared cores.
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] | None = None


class BatchingArgs(BaseModel):
    """The classifier's dynamic batching: its Serve user_config, changed in place by reconfigure()."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(8, ge=1)
    # Serve's batcher forms the next batch while earlier ones run, so a wait only delays a lone request; on
    # CPU a batch of 1 costs no more per image than a batch of 8. Give it a few ms on a GPU.
    batch_wait_timeout_s: float = Field(0.0, ge=0)


class ModelSource(BaseModel):
    """The model a Classifier or Explainer replica serves, in its user_config: a promotion reaches the live replicas
    through Serve's reconfigure() (they load it beside the old one and switch; no restart; serve/replica.py)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(min_length=1)   # the checkpoint directory Predictor loads
    version: str | None = None   # the registry's "NAME@VERSION" when it came from one, else None


class ClassifierConfig(BatchingArgs):
    """The Classifier's whole user_config: batching, and the model (None: the checkpoint it was built with)."""

    model: ModelSource | None = None


class ClassifierArgs(TorchDeploymentArgs, BatchingArgs):
    # 8 batches of 8 waiting per caller beyond the replica's 32: ~3 s of work on 2 CPU cores at 224 px; past it a
    # classify is answered 503 + Retry-After at once instead of waiting (serve/ingress.py)
    max_queued_requests: int = Field(64, ge=-1)
    decode_threads: int = 2
    # Batches that run at once (ForwardLanes): one alone gets every torch thread (lowest latency); beside
    # it, others run single-threaded. On CPU, two 1-thread forwards of a small CNN do ~1.3x the work of one
    # 2-thread forward (less synchronisation per op). 1 on a GPU.
    forward_lanes: int = Field(2, ge=1, le=MAX_FORWARD_LANES)

    def batching(self) -> dict[str, Any]:
        """The batching part of the Classifier's user_config."""
        return self.model_dump(include=set(BatchingArgs.model_fields))

    def user_config(self, model: ModelSource | None) -> dict[str, Any]:
        """The user_config of the Classifier deployment (ClassifierConfig): batching and the model it serves."""
        return {**self.batching(), "model": model.model_dump() if model else None}


class ExplainerConfig(BaseModel):
    """The Explainer's whole user_config: the model (None: the checkpoint it was built with)."""

    model_config = ConfigDict(extra="forbid")
    model: ModelSource | None = None


class ExplainerArgs(TorchDeploymentArgs):
    num_cpus: float = 0.5
    concurrency: int = 1          # model copies, i.e. concurrent Grad-CAM calls per replica
    max_ongoing_requests: int = 8
    max_queued_requests: int = Field(16, ge=-1)   # saliency waiting beyond that: 503 + Retry-After

    def user_config(self, model: ModelSource | None) -> dict[str, Any]:
        """The user_config of the Explainer deployment (ExplainerConfig): the model it explains with
        (AppArgs.explainer_source)."""
        return {"model": model.model_dump() if model else None}


class IngressArgs(DeploymentArgs):
    num_cpus: float = 0.25
    max_ongoing_requests: int = 128
    # Uploads up to this size reach the Classifier over Serve's inter-deployment gRPC: one unary call,
    # where a Ray actor call is a streaming one (an acknowledgement, then the answer), ~3 ms more per
    # request on 2 cores. Larger uploads and saliency (a PNG at the input's size) use actor calls; 0: only those.
    grpc_max_upload_mb: float = Field(3.0, ge=0, le=GRPC_UPLOAD_LIMIT_MB)
    # Swagger UI at /docs: FastAPI's page loads its script from a public CDN (no integrity hashes) on the
    # origin of the review page and its token. Off: /docs is 404 and /openapi.json stays; on for development
    # (`dermaid serve ... ingress.docs=true`). Reaches the Ingress as its user_config (no restart to change).
    docs: bool = False
    # An answer not ready after this many seconds is a JSON 503 (code "timeout") with Retry-After; Serve's own
    # request_timeout_s (http_options) is set a little above it as the backstop (serve/launcher.py)
    request_timeout_s: float = Field(30.0, gt=0)
    # Retry-After (seconds) of a 503 when a model's queue is full (max_queued_requests) or an answer timed out
    retry_after_s: int = Field(1, ge=0)
    # Requests per client address in a moving minute (None: no limit), every route but the probes and the
    # token-checked review API; past it 429 + Retry-After before the body is read (serve/quotas.py). Counted in
    # each Ingress replica's memory (N replicas: up to N x this); the client is found as for the upload limit
    # (storage.trusted_proxies).
    requests_per_client_per_minute: int | None = Field(None, ge=1)

    def user_config(self) -> dict[str, Any]:
        """The user_config of the Ingress deployment (Ingress.reconfigure)."""
        return {"docs": self.docs}


class StorageArgs(BaseModel):
    """Where consented uploads go. db_url None: $DERMAID_DATABASE_URL (read in the replica, so a password
    never sits in the app's arguments), else a SQLite file under a local `url`."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field("uploads", min_length=1)  # fsspec URL of the blobs (local dir, gs://bucket/prefix)
    db_url: str | None = None     # SQLAlchemy URL (PostgreSQL in deployment)
    # What the public may store (serve/quotas.py); past a limit a consented classify gets 429 + Retry-After.
    # Consented uploads per client address in a moving hour (None: no limit). Counted in each Ingress
    # replica's memory: with N replicas a client may store up to N x this.
    uploads_per_client_per_hour: int | None = Field(60, ge=1)
    # MiB of blobs (photos, model inputs, records) stored per UTC day, counted from the database and the
    # blob store, so every replica sees the same total (None: no quota). Exact duplicates are never stored twice.
    daily_quota_mb: float | None = Field(1024.0, gt=0)
    # The client address is the TCP peer's. X-Forwarded-For is believed only when the peer is one of these
    # addresses or CIDR ranges (your TLS proxy or load balancer; a GKE Gateway: 35.191.0.0/16, 130.211.0.0/22);
    # then the client is its rightmost entry that is not one of them. Empty: the header is ignored.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Days an upload no dermatologist has labelled is kept; `dermaid uploads purge` (run it daily) deletes older
    # ones. The consumer page states it in its privacy note (GET /v1/privacy). None: no automatic deletion.
    retention_days: float | None = Field(None, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8)") from None
        return value


class ReviewArgs(BaseModel):
    """Who may use the review routes (serve/review.py): these tokens, fixed for a deploy, plus the uploads
    database's (`dermaid reviewers add|revoke|list`: no redeploy)."""

    model_config = ConfigDict(extra="forbid")
    tokens: dict[str, str] = Field(default_factory=dict, description="reviewer -> token HASH 'sha256$<hex>' "
                                                                     "(`python -m dermaid.auth new NAME`)")
    tokens_env: str = Field(TOKENS_ENV, description="environment variable with plain 'name:token,...' (names required; "
                                                    "random tokens only; hashed on load)")
    # Blinded review: a reviewer sees the photo and its metadata, chooses (class, confidence, advice), and only
    # then the model's answer, its saliency and the other reviewers' labels; Label Studio tasks carry no
    # pre-annotation and the queue is not filtered by the model's class. false: everything shown at once.
    blinded: bool = True


class AppArgs(BaseModel):
    """Arguments of `build_app` (validated by Serve from a config file's `args` or from the CLI)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None   # a checkpoint directory; or `model_url`
    # registry://NAME/STAGE: serve what the registry's stage points at, and follow it (`dermaid serve` swaps
    # the model in place on promotion); registry://NAME@VERSION: one version. Replaces `checkpoint`.
    model_url: str | None = None   # (not `model`: that word is the Hydra group conf/model/)
    registry_root: str | None = None   # the registry `model_url` names (dermaid.registry; `dermaid registry`)
    explainer_checkpoint: str | None = None
    device: str = "cpu"
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    # /v1/saliency refuses (413) images over this many pixels (~5000x5000, a 24 MP camera's photo; capped at
    # max_pixels, as the route classifies too). Its overlay is bounded by overlay_max_side; a full_size one costs
    # the Explainer ~16 bytes per upload pixel (~0.4 GB at this limit; docs/benchmarks.md).
    saliency_max_pixels: int = Field(25_000_000, ge=1)
    # longest side of a saliency overlay in pixels (the upload scaled down; full_size=true asks for its own size)
    overlay_max_side: int = Field(OVERLAY_MAX_SIDE, ge=64)
    malignant_codes: list[str] = Field(default_factory=lambda: list(MALIGNANT_CODES))
    triage: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TRIAGE))
    storage: StorageArgs = Field(default_factory=StorageArgs)
    review: ReviewArgs = Field(default_factory=ReviewArgs)   # dermatologist tokens (hashes) for /review
    classifier: ClassifierArgs = Field(default_factory=ClassifierArgs)
    explainer: ExplainerArgs = Field(default_factory=ExplainerArgs)
    ingress: IngressArgs = Field(default_factory=IngressArgs)
    monitoring: MonitoringArgs = Field(default_factory=MonitoringArgs)  # metrics + prediction log (serve/metrics.py)

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
    def _one_model(self) -> "AppArgs":
        if self.model_url and self.checkpoint:
            raise ValueError("give checkpoint= (a directory) or model_url= (registry://NAME/STAGE), not both")
        if not (self.model_url or self.checkpoint):
            raise ValueError("checkpoint= is required (a checkpoint directory; or model_url=registry://NAME/STAGE to "
                             "serve and follow a registry stage)")
        if self.model_url and is_registry_url(self.model_url) and not self.registry_root:
            raise ValueError(f"model_url={self.model_url} needs registry_root= (the registry's directory or URL)")
        if self.registry_root:
            self.registry_root = absolute_url(self.registry_root)
        return self

    def model_source(self) -> ModelSource:
        """What the Classifier serves now: `checkpoint`, or what the registry resolves `model_url` to (RegistryError
        when the stage or version is unknown)."""
        if not self.model_url:
            return ModelSource(checkpoint=self.checkpoint)
        from dermaid.registry import resolve_model_url

        checkpoint, version = resolve_model_url(self.model_url, self.registry_root or "")
        return ModelSource(checkpoint=checkpoint,
                           version=f"{registry_name(self.model_url)}@{version}" if is_registry_url(self.model_url) else None)

    def explainer_source(self, model: ModelSource) -> ModelSource:
        """What the Explainer serves beside the Classifier's `model`: explainer_checkpoint when given (fixed, so its
        answers name no registry version), else `model` itself. The replica loads its float weights
        (models.card.float_weights_for: a compressed artifact's float source); nothing is read here."""
        if self.explainer_checkpoint:
            return ModelSource(checkpoint=self.explainer_checkpoint)
        return model

    @model_validator(mode="after")
    def _absolute_storage(self) -> "AppArgs":
        # Replicas may run in another working directory: pin local paths at build time.
        self.storage.url = absolute_url(self.storage.url)
        return self


def is_registry_url(url: str) -> bool:
    return str(url).startswith(REGISTRY_SCHEME)


def registry_name(url: str) -> str:
    """registry://NAME/STAGE or registry://NAME@VERSION -> NAME."""
    return str(url)[len(REGISTRY_SCHEME):].strip("/").split("/")[0].split("@")[0]


def deployment_options(spec: DeploymentArgs) -> dict[str, Any]:
    """One deployment's arguments -> the keywords of Serve's `Deployment.options(...)`."""
    options: dict[str, Any] = {
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
    }
    if isinstance(spec, TorchDeploymentArgs) and spec.omp_wait_policy:
        # read by the OpenMP runtime when the process loads it: only an env var set at process start works
        options["ray_actor_options"]["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": spec.omp_wait_policy}}
    if spec.autoscaling_config:
        options["autoscaling_config"] = spec.autoscaling_config
    else:
        options["num_replicas"] = spec.num_replicas
    if isinstance(spec, IngressArgs):
        options["user_config"] = spec.user_config()
    return options
