"""DermAID on Ray Serve: a classifier and an explainer deployment behind one FastAPI ingress.

    dermaid serve checkpoint=runs/toy/best                  # local Ray, http://127.0.0.1:8000 (conf/serve.yaml)
    dermaid serve model_url=registry://NAME/production       # follows the stage: promotions swap the model in place
    serve run serve/config.yaml                             # any Ray cluster; app args in the file
    serve run serve.app:build_app checkpoint=/abs/ckpt      # quick try with default args
    serve deploy serve/config.yaml                          # a running cluster (or a KubeRay RayService)

The package, one idea per module:
    args.py        AppArgs: the typed arguments of build_app, the one source of every Serve default
    classifier.py  Classifier: dermaid.inference.Predictor behind @serve.batch, decoding in a thread pool
    lanes.py       ForwardLanes: the threads the classifier's batches run on, sharing the torch threads
    explainer.py   Explainer: Grad-CAM overlays, one model copy per concurrent call, swapped like the classifier
    ingress.py     Ingress: the FastAPI routes (/v1/classify, /v1/saliency, /v1/model, /healthz, /readyz)
    schemas.py     the routes' form fields and response bodies (OpenAPI)
    errors.py      the one JSON error shape, image-error mapping, the body-size limit
    review.py      the web pages and the dermatologist review API (a router the ingress includes)
    replica.py     what a model replica shares: the model it serves and the switch to another (ModelSlot)
    launcher.py    `dermaid serve`: a local Ray + Serve + this app from conf/serve.yaml

Nothing runs at import time: the modules only declare classes; models load in replica __init__.
Every error is JSON {"error": {"code": ..., "message": ...}} with a 4xx status for client input.
Outputs are decision support, never a diagnosis (the disclaimer is in every result).
"""

from ray.serve import Application

from dermaid.uploads.schema import migrate_uploads_database
from serve.args import AppArgs, deployment_options
from serve.classifier import Classifier
from serve.explainer import Explainer
from serve.ingress import Ingress
from serve.review import review_settings


def build_app(args: AppArgs) -> Application:
    """Compose Classifier + Explainer + Ingress (`serve run serve.app:build_app checkpoint=...`).

    `args` is annotated with AppArgs alone, and no `from __future__ import annotations`: Serve validates
    a config file's args into the annotated model. A plain dict (tests, scripts) is validated here.
    Builds run once per deploy, before any replica: the uploads database is migrated here, once."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    migrate_uploads_database(args.storage.url, args.storage.db_url)
    c, e = args.classifier, args.explainer
    model = args.model_source()  # checkpoint, or where the registry's stage points now
    # the model is in both model deployments' user_config: a promotion redeploys only that, and Serve calls
    # reconfigure() on the live replicas (serve/launcher.py StageFollower); the init argument is what a replica
    # loads without one
    classifier = Classifier.options(**deployment_options(c), user_config=c.user_config(model)).bind(
        model.checkpoint, args.device, args.max_pixels, c.torch_threads, c.decode_threads, c.forward_lanes,
    )
    explained = args.explainer_source(model)
    explainer = Explainer.options(**deployment_options(e), user_config=e.user_config(explained)).bind(
        explained.checkpoint, args.device, min(args.saliency_max_pixels, args.max_pixels),
        e.torch_threads, e.concurrency, args.overlay_max_side,
    )
    settings = {"max_upload_mb": args.max_upload_mb, "malignant_codes": args.malignant_codes,
                "grpc_max_upload_mb": args.ingress.grpc_max_upload_mb,
                "request_timeout_s": args.ingress.request_timeout_s, "retry_after_s": args.ingress.retry_after_s,
                "requests_per_client_per_minute": args.ingress.requests_per_client_per_minute,
                "triage": args.triage, "storage": args.storage.model_dump(),
                "review": review_settings(args.review), "monitoring": args.monitoring.model_dump()}
    return Ingress.options(**deployment_options(args.ingress)).bind(classifier, explainer, settings)
