"""`dermaid serve`: serve a checkpoint over HTTP with Ray Serve on a local Ray (conf/serve.yaml).

    dermaid serve checkpoint=runs/toy/best                       # http://127.0.0.1:8000, Ctrl-C stops
    dermaid serve checkpoint=runs/toy/best port=8080 classifier.max_batch_size=16
    dermaid serve checkpoint=runs/toy/best storage.url=/data/uploads host=0.0.0.0

On a cluster, the same application runs with `serve run serve/config.yaml` or
`serve deploy serve/config.yaml` (serve/app.py: build_app). Results are decision support, never a
diagnosis.
"""

from __future__ import annotations

import os
import time
from typing import Any

from omegaconf import DictConfig

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.ray_compat import DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT, direct_ingress_env


def build_app_args(cfg: DictConfig | dict[str, Any]):
    """conf/serve.yaml -> serve.app.AppArgs (validated; a DermaidError names the bad key)."""
    from pydantic import ValidationError

    from serve import app as serve_app
    plain = to_plain(cfg)
    try:
        return serve_app.AppArgs.model_validate({k: plain[k] for k in serve_app.AppArgs.model_fields if k in plain})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise DermaidError(f"serve config: {problems}") from None


def local_serve_env(port: int) -> dict[str, str]:
    """The environment of a private Ray started to serve on `port` (dermaid.ray_compat.direct_ingress_env)."""
    return direct_ingress_env(port)


def _serves_directly(port: int) -> bool:
    """True when the Ray this process runs was started with direct ingress pinned to `port`."""
    env = local_serve_env(port)
    return all(os.environ.get(key) == env[key] for key in (DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT))


def start(cfg: DictConfig | dict[str, Any]) -> str:
    """Start Ray (if needed), Serve on host:port, and the application; returns the base URL.

    direct_ingress (conf/serve.yaml): when this call starts the private local Ray and the ingress has one
    fixed replica, that replica listens on host:port itself and Serve's proxy moves to a spare port.
    Otherwise (a Ray already running, a cluster, several ingress replicas) the proxy listens on host:port."""
    import ray
    from ray import serve

    from dermaid.models.card import float_weights_for, load_card
    from dermaid.processes import free_port
    from dermaid.ray_runtime import ensure_ray
    from dermaid.files import absolute_url

    plain = to_plain(cfg)
    args = build_app_args(plain)
    load_card(args.checkpoint)  # a missing or foreign checkpoint fails here, before Ray starts
    # and so do Grad-CAM's float weights; resolved here, where a relative source means what the user meant
    args.explainer_checkpoint = absolute_url(float_weights_for(args.explainer_checkpoint or args.checkpoint))
    from serve import app as serve_app
    host, port = str(plain.get("host", "127.0.0.1")), int(plain.get("port", 8000))
    ray_cfg = plain.get("ray") or {}
    address = ray_cfg.get("address", "local")
    single_ingress = args.ingress.num_replicas == 1 and not args.ingress.autoscaling_config
    if plain.get("direct_ingress", True) and single_ingress and address == "local" and not ray.is_initialized():
        os.environ.update(local_serve_env(port))
    ensure_ray(address, ray_cfg.get("num_cpus"))  # replicas get the checkout on PYTHONPATH
    direct = single_ingress and _serves_directly(port)
    serve.start(http_options={"host": host, "port": free_port(host) if direct else port})
    serve.run(serve_app.build_app(args), name=str(plain.get("app_name", "dermaid")), route_prefix="/")
    return f"http://{host}:{port}"


def print_usage(url: str, image: str = "lesion.jpg") -> None:
    """The URL and example curl commands (with `image` as the example upload)."""
    print(f"DermAID is serving at {url} (OpenAPI docs: {url}/docs)")
    print(f"  web page:             {url}/")
    print(f"  dermatologist review: {url}/review   (a reviewer token: review.tokens or $DERMAID_REVIEWER_TOKENS)")
    print("Try:")
    print(f"  curl -s {url}/readyz")
    print(f"  curl -s -F image=@{image} -F age=55 -F sex=male -F site='posterior torso' {url}/v1/classify")
    print(f"  curl -s -F image=@{image} -F method=gradcam -o saliency.png {url}/v1/saliency")
    print(f"  curl -s -F image=@{image} -F consent=true {url}/v1/classify   # store for dermatologist review")
    print(DISCLAIMER)


def run(cfg: DictConfig, example_image: str = "lesion.jpg", reviewer_token: str | None = None) -> str:
    """`dermaid serve checkpoint=PATH [host=] [port=] [key=value ...]`; blocks until Ctrl-C unless blocking=false.

    reviewer_token: a plain token whose hash is in cfg.review.tokens (the demo's), printed with the URLs."""
    url = start(cfg)
    print_usage(url, example_image)
    if reviewer_token:
        print(f"Dermatologist review: open {url}/review and sign in with the reviewer token {reviewer_token}")
    if not cfg.get("blocking", True):
        return url
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping DermAID serve")
    finally:
        serve.shutdown()
    return url
