"""Every private Ray API DermAID uses, in one module, each behind a small function.

Ray is pinned to the minor version these were tested on (pyproject.toml); `tests/test_ray_compat.py`
touches each one and fails naming the API when an upgrade moves it. Callers never import
`ray._private`, `ray.*._internal` or `ray.serve._private` themselves, and never spell a private
keyword argument or environment variable of Ray's.

    quiet_train_report_log(level)         Ray Train V2's per-report logger (ray.train.v2._internal)
    placement_group_table()               the GCS placement-group table (ray._private.state)
    by_value_handle(handle)               Serve's gRPC handle transport (handle.options(_by_reference=False))
    direct_ingress_env(port)              Serve's direct-ingress and throughput environment variables
    worker_setup_hook_env(hook)           the worker setup hook's environment variable (ray._private.ray_constants)
    train_worker_start_timeout_env(s)     Ray Train's worker-group start timeout (ray.train.v2._internal.constants)
    build_serve_app(builder, args, name)  what `serve deploy` does with import_path + args, short of deploying
    deployment_schemas(app, name)         the deployments Serve would create for an Application
    deploy_applications(apps)             what `serve deploy` does with a config's applications (Serve's client)
    validate_cluster_launcher(config)     the cluster launcher's own schema check
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Each private API by its dotted name: the test of this module imports every one and says which moved.
PRIVATE_APIS = {
    "train_report_logger": "ray.train.v2._internal.execution.context",
    "placement_group_table": "ray._private.state",
    "worker_setup_hook_env": "ray._private.ray_constants",
    "serve_build_app": "ray.serve._private.build_app",
    "serve_app_builder_args": "ray.serve._private.api",
    "serve_global_client": "ray.serve.context",
    "cluster_launcher_validation": "ray.autoscaler._private.util",
    "train_worker_start_timeout": "ray.train.v2._internal.constants",
    "placement_group_cleaner_log": "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "autoscaling_coordinator_log": "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
}
# Ray Train's loggers (named after their private modules, above) -> message starts that are benign on a local
# Ray without the dashboard; dermaid.ray_runtime filters them out of the demo's and the tests' logs.
BENIGN_TRAIN_LOGS: dict[str, tuple[str, ...]] = {
    PRIVATE_APIS["placement_group_cleaner_log"]: ("Failed to query Ray Train Controller actor state",),
    PRIVATE_APIS["autoscaling_coordinator_log"]: ("Failed to send resource request",),
}
# Serve's environment variables for direct ingress (read by the raylet, the controller and the replicas
# when they start, so only a Ray started after they are set has them). Names as of Ray 2.60.
DIRECT_INGRESS_FLAG = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
DIRECT_INGRESS_MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"


def quiet_train_report_log(level: str) -> None:
    """Hold Ray Train V2's per-report logger (it logs every metrics dict, through a logger named after
    its file, which LoggingConfig does not reach) to `level`. Best effort: other Ray versions keep their
    default logging."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        log.debug("%s not found; Ray Train's report log stays at its default", PRIVATE_APIS["train_report_logger"])
        return
    logging.getLogger(train_context.__file__).setLevel(getattr(logging, str(level).upper(), logging.WARNING))


def placement_group_table() -> list[Any]:
    """The GCS placement-group table as `gcs_pb2.PlacementGroupTableData` records (all jobs).

    Read directly, not through the State API, which needs the dashboard (we start Ray without it)."""
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2

    table = global_state._connect_and_get_accessor().get_placement_group_table()
    return [gcs_pb2.PlacementGroupTableData.FromString(blob) for blob in table]


def by_value_handle(handle: Any) -> Any | None:
    """The same deployment handle over Serve's gRPC transport (arguments serialised by value, not put in
    the object store); None where this Ray has no such option."""
    try:
        return handle.options(_by_reference=False)
    except TypeError:
        return None


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment of a private Ray started to serve on `port` with direct ingress.

    Direct ingress, pinned to `port`: the Ingress replica runs the HTTP server itself. Without it every
    request crosses Serve's proxy actor first (HTTP there, then the body relayed to the replica through
    actor calls); on 2 cores that relay cost ~20 ms of CPU per upload, as much as the whole ingress.
    Worker niceness 0: Ray starts workers at nice 15 below its own daemons, so the replicas' forwards
    lost ~10 ms to them at concurrency 1. The two RUN_ settings are from Serve's throughput-optimized
    profile; our replicas never block their event loop (the work runs in thread pools)."""
    return {
        "RAY_worker_niceness": "0",
        DIRECT_INGRESS_FLAG: "1",
        DIRECT_INGRESS_MIN_PORT: str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),   # the range is [min, max): exactly `port`
        "RAY_SERVE_PORT_QUARANTINE_S": "0",              # a restarted ingress replica takes the port back at once
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",   # Ctrl-C stops in about a second, not 30
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",       # replica code on the actor's event loop: one
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",            # thread hop less per call, and the same for handles
    }


def worker_setup_hook_env(hook: str) -> dict[str, str]:
    """Environment that makes every worker of a Ray started afterwards from this process call `hook`
    ("module.function") when it starts: what `runtime_env={"worker_process_setup_hook": ...}` does, but
    without a job runtime_env, so the workers Ray prestarts with the default environment still serve
    the job (a runtime_env would make every task and actor wait for a fresh worker)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: hook}


def train_worker_start_timeout_env(seconds: float) -> dict[str, str]:
    """Environment that gives Ray Train's worker group `seconds` to start (read when a trainer starts its workers;
    a trial waiting behind another trial's placement group needs longer than Train's 60 s default)."""
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR

    return {WORKER_GROUP_START_TIMEOUT_S_ENV_VAR: str(seconds)}


def build_serve_app(builder: Any, args: dict[str, Any], name: str) -> tuple[Any, list[Any]]:
    """What `serve deploy` / KubeRay do with an import_path's builder and its args, short of deploying:
    -> (Application, [DeploymentSchema, ...])."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(builder, args)
    return app, deployment_schemas(app, name)


def deployment_schemas(app: Any, name: str) -> list[Any]:
    """The DeploymentSchemas Serve would deploy for an Application (its options resolved)."""
    from ray.serve._private.build_app import build_app
    from ray.serve.deployment import deployment_to_schema

    return [deployment_to_schema(d) for d in build_app(app, name=name).deployments]


def deploy_applications(apps: list[dict[str, Any]]) -> None:
    """Deploy Serve application configs (ServeApplicationSchema dicts) on the running Serve, as `serve deploy` and
    KubeRay do: the controller builds each from import_path + args. Deploying one again with only a deployment's
    user_config changed is Serve's documented lightweight update: reconfigure() on the live replicas, no restart.
    Other applications deployed this way stay (a Serve config deploy removes the ones it does not name)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

    client = _get_global_client()
    details = ServeInstanceDetails(**client.get_serve_details())
    names = {app["name"] for app in apps}
    kept = [app.deployed_app_config.model_dump(exclude_unset=True) for name, app in details.applications.items()
            if app.deployed_app_config is not None and name not in names]
    client.deploy_apps(ServeDeploySchema(applications=[*kept, *apps]))


def validate_cluster_launcher(config: dict[str, Any]) -> None:
    """Ray's cluster launcher schema and consistency checks (raises on an invalid config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
