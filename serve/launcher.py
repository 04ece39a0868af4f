"""`dermaid serve`: serve a checkpoint over HTTP with Ray Serve on a local Ray (conf/serve.yaml).

    dermaid serve checkpoint=runs/toy/best                       # http://127.0.0.1:8000, Ctrl-C stops
    dermaid serve checkpoint=runs/toy/best port=8080 classifier.max_batch_size=16
    dermaid serve checkpoint=runs/toy/best storage.url=/data/uploads host=0.0.0.0

On a cluster, the same application runs with `serve run serve/config.yaml` or
`serve deploy serve/config.yaml` (serve/app.py: build_app). Every input (the config's keys, the
checkpoint, Grad-CAM's float weights, reviewer tokens) is checked before Ray starts. Results are
decision support, never a diagnosis.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, ValidationError

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.ray_compat import DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT, direct_ingress_env

if TYPE_CHECKING:
    from serve.args import AppArgs  # imported where used: it brings torch (dermaid.inference)


class RayArgs(BaseModel):
    """conf/serve.yaml `ray`: which Ray serves."""

    model_config = ConfigDict(extra="ignore")
    address: str | None
    num_cpus: int | None


class ServerArgs(BaseModel):
    """conf/serve.yaml's keys for `dermaid serve` itself (the app's are AppArgs); their values live there."""

    model_config = ConfigDict(extra="ignore")
    host: str
    port: int
    app_name: str
    direct_ingress: bool
    blocking: bool
    ray: RayArgs


def build_app_args(cfg: DictConfig | dict[str, Any]) -> AppArgs:
    """conf/serve.yaml -> serve.args.AppArgs (validated; a DermaidError names the bad key)."""
    from serve.args import AppArgs

    plain = to_plain(cfg)
    return _validated(AppArgs, {k: plain[k] for k in AppArgs.model_fields if k in plain})


def build_server_args(cfg: DictConfig | dict[str, Any]) -> ServerArgs:
    """conf/serve.yaml -> ServerArgs (validated; a DermaidError names a missing or bad key)."""
    return _validated(ServerArgs, to_plain(cfg))


def _validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise DermaidError(f"serve config: {problems}") from None


def _serves_directly(port: int) -> bool:
    """True when the Ray this process runs was started with direct ingress pinned to `port`."""
    env = direct_ingress_env(port)
    return all(os.environ.get(key) == env[key] for key in (DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT))


def _checked_app_args(cfg: DictConfig | dict[str, Any]) -> AppArgs:
    """AppArgs whose checkpoints exist: a missing or foreign checkpoint, or Grad-CAM's float weights
    gone, fails here, before Ray starts."""
    from dermaid.files import absolute_url
    from dermaid.models.card import float_weights_for, load_card

    args = build_app_args(cfg)
    load_card(args.checkpoint)
    # resolved here, where a relative float source means what the user meant
    args.explainer_checkpoint = absolute_url(float_weights_for(args.explainer_checkpoint or args.checkpoint))
    return args


def start(cfg: DictConfig | dict[str, Any]) -> str:
    """Check every input, then start Ray (if needed), Serve on host:port, and the application; returns the base URL.

    direct_ingress (conf/serve.yaml): when this call starts the private local Ray and the ingress has one
    fixed replica, that replica listens on host:port itself and Serve's proxy moves to a spare port.
    Otherwise (a Ray already running, a cluster, several ingress replicas) the proxy listens on host:port."""
    import ray
    from ray import serve

    from dermaid.processes import free_port
    from dermaid.ray_runtime import ensure_ray
    from serve.app import build_app

    server = build_server_args(cfg)
    args = _checked_app_args(cfg)
    app = build_app(args)  # reviewer tokens are resolved here: a malformed one fails before Ray starts
    host, port = server.host, server.port
    single_ingress = args.ingress.num_replicas == 1 and not args.ingress.autoscaling_config
    if server.direct_ingress and single_ingress and server.ray.address == "local" and not ray.is_initialized():
        os.environ.update(direct_ingress_env(port))
    ensure_ray(server.ray.address, server.ray.num_cpus)
    direct = single_ingress and _serves_directly(port)
    serve.start(http_options={"host": host, "port": free_port(host) if direct else port})
    serve.run(app, name=server.app_name, route_prefix="/")
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
    if not build_server_args(cfg).blocking:
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
