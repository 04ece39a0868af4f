"""`dermaid serve`: serve a checkpoint over HTTP with Ray Serve on a local Ray (conf/serve.yaml).

    dermaid serve checkpoint=runs/toy/best                       # http://127.0.0.1:8000, Ctrl-C stops
    dermaid serve checkpoint=runs/toy/best port=8080 classifier.max_batch_size=16
    dermaid serve checkpoint=runs/toy/best storage.url=/data/uploads host=0.0.0.0
    dermaid serve model_url=registry://NAME/production           # follows the stage (registry_root=, conf/serve.yaml)

The app is deployed the way `serve deploy` and KubeRay deploy it: a Serve config (import_path serve.app:build_app
plus its args) that the Serve controller builds. That is what makes a promotion cheap: with `model_url=registry://...`
the command polls the stage pointer (follow_interval_s) and, when it moves, deploys the same config with only the
Classifier's and the Explainer's user_config changed (the resolved checkpoint and version), in one deploy. Serve then
calls reconfigure() on the live replicas without restarting them (its "lightweight update"); each loads the new model
beside the old one and switches when it is loaded (serve/replica.py ModelSlot), so saliency follows classification.
The watcher lives here, in the process that deployed the app, because one writer owns an app's config: on a cluster
that writer is the RayService, and the CD workflow updates the same user_config there (cluster/); a deployment
redeploying its own app would fight it.

Start-up prints where the time went (command, checks, Ray, Serve, replica start, model load, warm-up, ready).

On a cluster, the same application runs with `serve run serve/config.yaml` or
`serve deploy serve/config.yaml` (serve/app.py: build_app). Every input (the config's keys, the
checkpoint, Grad-CAM's float weights, reviewer tokens) is checked before Ray starts. Results are
decision support, never a diagnosis.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, ValidationError

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.ray_compat import DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT, direct_ingress_env

if TYPE_CHECKING:
    from serve.args import AppArgs, ModelSource  # imported where used: it brings torch (dermaid.inference)

log = logging.getLogger(__name__)
IMPORT_PATH = "serve.app:build_app"   # what the Serve controller builds (serve/config.yaml names the same)
TIMEOUT_MARGIN_S = 5.0   # Serve's request_timeout_s = ingress.request_timeout_s + this: the Ingress answers first


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
    follow_interval_s: float
    start_timeout_s: float
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
        # a model-wide rule (no key in `loc`) already names its keys; pydantic prefixes our ValueErrors' text
        problems = "; ".join(
            ": ".join([".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")][not e["loc"]:])
            for e in exc.errors())
        raise DermaidError(problems if all(not e["loc"] for e in exc.errors()) else f"serve config: {problems}") from None


def _serves_directly(port: int) -> bool:
    """True when the Ray this process runs was started with direct ingress pinned to `port`."""
    env = direct_ingress_env(port)
    return all(os.environ.get(key) == env[key] for key in (DIRECT_INGRESS_FLAG, DIRECT_INGRESS_MIN_PORT))


def _checked_app_args(cfg: DictConfig | dict[str, Any]) -> AppArgs:
    """AppArgs whose checkpoints exist: a missing or foreign checkpoint, or Grad-CAM's float weights
    gone, fails here, before Ray starts."""
    from dermaid.models.card import load_card

    args = build_app_args(cfg)
    try:
        model = args.model_source()   # model=registry://...: a RegistryError names what is missing
    except DermaidError as exc:
        raise DermaidError(f"serve: model_url={args.model_url}: {exc}") from None
    load_card(model.checkpoint)
    explained = explainer_source(args, model)   # Grad-CAM's float weights gone: fails here
    if args.explainer_checkpoint:   # given (Grad-CAM's weights whatever the model): pinned where the user meant it
        args.explainer_checkpoint = explained.checkpoint
    return args


def explainer_source(args: AppArgs, model: ModelSource) -> ModelSource:
    """args.explainer_source(model) with its float weights resolved here, where a relative float source means what
    the user meant (a CheckpointError when they are gone)."""
    from dermaid.files import absolute_url
    from dermaid.models.card import float_weights_for

    source = args.explainer_source(model)
    return source.model_copy(update={"checkpoint": absolute_url(float_weights_for(source.checkpoint))})


def app_config(name: str, args: AppArgs, model: ModelSource) -> dict[str, Any]:
    """The Serve application config (ServeApplicationSchema) of `dermaid serve`: build_app's args as given (so a
    promotion changes no code version) and the Classifier's and the Explainer's user_config with the model they serve
    now (reads the model's card: its float weights)."""
    explained = explainer_source(args, model)
    return {"name": name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args.model_dump(mode="json"),
            "deployments": [{"name": "Classifier", "user_config": args.classifier.user_config(model)},
                            {"name": "Explainer", "user_config": args.explainer.user_config(explained)}]}


@dataclass
class StageFollower:
    """Keeps a deployed app's Classifier and Explainer on what `model_url=registry://NAME/STAGE` points at (see the
    module docstring).

    check() reads the pointer (one small file); when it moved, the new version's card is checked and the app's
    config is deployed again with only the Classifier's and the Explainer's user_config changed. A registry that
    cannot be read is logged and the service keeps its model."""

    name: str
    args: AppArgs
    current: ModelSource
    switches: list[tuple[float, ModelSource]] = field(default_factory=list)  # (time.time(), what it switched to)

    def check(self) -> ModelSource | None:
        """Redeploy when the stage moved: the new ModelSource, else None."""
        from dermaid.models.card import load_card
        from dermaid.ray_compat import deploy_applications

        try:
            new = self.args.model_source()
            if new == self.current:
                return None
            load_card(new.checkpoint)   # a version whose card is unreadable never reaches a replica
            config = app_config(self.name, self.args, new)   # nor one whose Grad-CAM float weights are gone
        except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop the service
            log.warning("registry %s: %s; keeping %s", self.args.model_url, exc, self.current.version)
            return None
        deploy_applications([config])
        print(f"{self.args.model_url} moved: {self.current.version} -> {new.version} "
              "(loading beside the running model, then switching)", flush=True)
        self.current = new
        self.switches.append((time.time(), new))
        return new


@dataclass
class Started:
    """What start_app() started: the base URL, the stage follower (None for a fixed checkpoint), the phase seconds."""

    url: str
    follower: StageFollower | None
    phases: dict[str, float]


def start(cfg: DictConfig | dict[str, Any]) -> str:
    """start_app(cfg)'s base URL."""
    return start_app(cfg).url


def start_app(cfg: DictConfig | dict[str, Any]) -> Started:
    """Check every input, then start Ray (if needed), Serve on host:port, and the application; print the start-up
    phases. The app runs when this returns.

    direct_ingress (conf/serve.yaml): when this call starts the private local Ray and the ingress has one
    fixed replica, that replica listens on host:port itself and Serve's proxy moves to a spare port.
    Otherwise (a Ray already running, a cluster, several ingress replicas) the proxy listens on host:port."""
    import ray
    from ray import serve

    from dermaid.processes import free_port
    from dermaid.ray_compat import deploy_applications
    from dermaid.ray_runtime import ensure_ray
    from serve.args import is_registry_url
    from serve.review import review_settings

    marks = {"command": _process_start_time(), "start": time.time()}
    server = build_server_args(cfg)
    args = _checked_app_args(cfg)
    review_settings(args.review)  # reviewer tokens resolve here too: a malformed one fails before Ray starts
    model = args.model_source()
    marks["checked"] = time.time()
    host, port = server.host, server.port
    single_ingress = args.ingress.num_replicas == 1 and not args.ingress.autoscaling_config
    if server.direct_ingress and single_ingress and server.ray.address == "local" and not ray.is_initialized():
        os.environ.update(direct_ingress_env(port))
    ensure_ray(server.ray.address, server.ray.num_cpus)
    marks["ray"] = time.time()
    direct = single_ingress and _serves_directly(port)
    serve.start(http_options={"host": host, "port": free_port(host) if direct else port,
                              "request_timeout_s": args.ingress.request_timeout_s + TIMEOUT_MARGIN_S})
    marks["serve"] = time.time()
    deploy_applications([app_config(server.app_name, args, model)])
    _wait_running(server.app_name, server.start_timeout_s)
    marks["running"] = time.time()
    phases = _phases(marks, serve.get_deployment_handle("Classifier", server.app_name).info.remote().result())
    print("start-up seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
    follower = (StageFollower(server.app_name, args, model)
                if args.model_url and is_registry_url(args.model_url) and "@" not in args.model_url else None)
    return Started(f"http://{host}:{port}", follower, phases)


def _wait_running(name: str, timeout_s: float) -> None:
    """Until the application runs; a DermaidError with Serve's message when it failed to deploy."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise DermaidError(f"serve: the application failed to start: {app.message}")
        time.sleep(0.1)
    raise DermaidError(f"serve: the application did not start within {timeout_s:g} s (start_timeout_s)")


def _phases(marks: dict[str, float], info: dict[str, Any]) -> dict[str, float]:
    """Seconds per start-up phase: marks from this process, the Classifier replica's own (info()["startup"])."""
    replica = info.get("startup") or {}
    # the replica's actor may reuse a worker process Ray started earlier, so its process start is no phase boundary
    points = [("command", marks["command"]), ("checks", marks["start"]), ("ray", marks["checked"]),
              ("serve", marks["ray"]), ("replica_start", marks["serve"]), ("model_load", replica.get("init_started")),
              ("warmup", replica.get("model_loaded")), ("ready", replica.get("warmed_up"))]
    points = [(name, t) for name, t in points if t is not None]
    phases = {name: max(0.0, nxt - t) for (name, t), (_, nxt) in zip(points, [*points[1:], ("end", marks["running"])])}
    # "command": interpreter, imports and the config before start_app; "replica_start": the controller's build of
    # the app, the replica's worker and its imports; "ready": warm-up done -> the application reported running
    phases["total"] = marks["running"] - marks["command"]
    return phases


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


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
    started = start_app(cfg)
    url = started.url
    print_usage(url, example_image)
    if reviewer_token:
        print(f"Dermatologist review: open {url}/review and sign in with the reviewer token {reviewer_token}")
    server = build_server_args(cfg)
    if not server.blocking:
        return url
    from ray import serve

    follower = started.follower
    if follower is not None:
        print(f"following {follower.args.model_url} (now {follower.current.version}; checked every "
              f"{server.follow_interval_s:g} s)")
    try:
        while True:
            time.sleep(server.follow_interval_s if follower is not None and server.follow_interval_s > 0 else 3600)
            if follower is not None and server.follow_interval_s > 0:
                follower.check()
    except KeyboardInterrupt:
        print("stopping DermAID serve")
    finally:
        serve.shutdown()
    return url
