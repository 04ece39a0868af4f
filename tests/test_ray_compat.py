"""Every private Ray API in dermaid.ray_compat still exists in the installed Ray (an upgrade that moves
one fails here, naming it), and each wrapper works against this Ray."""

from __future__ import annotations

import importlib

import pytest

from dermaid import ray_compat


@pytest.mark.parametrize("use", sorted(ray_compat.PRIVATE_APIS))
def test_private_ray_module_exists(use):
    module = ray_compat.PRIVATE_APIS[use]
    try:
        importlib.import_module(module)
    except ImportError as exc:  # the message is the point: which API moved, and for what
        pytest.fail(f"Ray moved the private API {module} ({use}) that dermaid.ray_compat uses: {exc}")


def test_private_ray_names_exist():
    from ray._private import state
    from ray.serve._private import api, build_app
    from ray.serve.handle import DeploymentHandle
    from ray.train.v2._internal.execution import context

    assert hasattr(state, "state"), "ray._private.state.state is gone (placement_group_table)"
    assert hasattr(state.state, "_connect_and_get_accessor"), "GlobalState._connect_and_get_accessor is gone"
    assert hasattr(api, "call_user_app_builder_with_args_if_necessary"), "Serve's app-builder args helper is gone"
    assert hasattr(build_app, "build_app"), "ray.serve._private.build_app.build_app is gone"
    assert context.__file__, "Ray Train's report logger module has no file"
    assert "_by_reference" in DeploymentHandle.options.__code__.co_varnames, \
        "DeploymentHandle.options no longer takes _by_reference (Serve's gRPC transport)"


def test_direct_ingress_env_pins_one_port():
    env = ray_compat.direct_ingress_env(8123)
    assert env[ray_compat.DIRECT_INGRESS_FLAG] == "1"
    assert (env[ray_compat.DIRECT_INGRESS_MIN_PORT], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8123", "8124")


def test_serve_reads_the_direct_ingress_variables():
    """Serve's constants module still reads the variable names we set (else direct ingress silently stops)."""
    from ray.serve._private import constants

    source = importlib.util.find_spec(constants.__name__).loader.get_source(constants.__name__)
    for name in ray_compat.direct_ingress_env(8000):
        if name.startswith("RAY_SERVE_"):
            assert name in source, f"Ray Serve no longer reads {name}"


def test_train_worker_start_timeout_is_the_variable_ray_train_reads():
    from ray.train.v2._internal import constants

    (name, value), = ray_compat.train_worker_start_timeout_env(600).items()
    assert value == "600" and name == constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
