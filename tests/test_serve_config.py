"""Serve configuration without starting Serve: serve/config.yaml, conf/serve.yaml, the RayService, build_app,
`dermaid serve` errors, and that every default in those files is AppArgs' (serve/args.py) or a listed override."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dermaid.errors import DermaidError

REPO = Path(__file__).resolve().parent.parent


# Values that differ from AppArgs' defaults on purpose, per file, with why. Any other value in these files
# must equal the default (test_every_serve_default_is_app_args_or_a_listed_override).
DELIBERATE_OVERRIDES: dict[str, dict[str, str]] = {
    "conf/serve.yaml": {
        "storage.url": "under ${paths.root} (DERMAID_HOME), not the working directory of `dermaid serve`",
        "monitoring.url": "the prediction log under ${paths.root}; AppArgs' None writes nowhere unasked",
        "registry_root": "the registry under ${paths.root}, as `dermaid registry` (conf/registry.yaml)",
    },
    "serve/config.yaml": {},
    "cluster/kuberay/rayservice.yaml": {
        "model_url": "the registry's production stage, which promotions move (serve/rollout.py)",
        "registry_root": "the registry in the bucket",
        "monitoring.url": "the prediction log in the bucket (the daily report reads it)",
        "storage.trusted_proxies": "the GKE Gateway's proxies (gateway.yaml), so per-client limits count clients",
        "storage.retention_days": "90 days, the purge CronJob's value (schedules.yaml)",
        "storage.url": "a bucket: pods have no shared disk",
        "storage.db_url": "Cloud SQL, rendered from the shell at apply time",
        "classifier.num_cpus": "a 6-CPU pod per two replicas: decode threads beside the torch threads",
        "classifier.max_batch_size": "bigger batches once several requests queue on a cluster",
        "classifier.batch_wait_timeout_s": "2 ms to fill a batch under load",
        "classifier.autoscaling_config": "1 warm replica, up to 8",
        "explainer.num_cpus": "Grad-CAM's backward pass needs both cores",
        "explainer.autoscaling_config": "1 warm replica, up to 4",
        "ingress.num_cpus": "half a core: validation and routing for many replicas",
        "ingress.autoscaling_config": "1 warm replica, up to 4",
        "ingress.requests_per_client_per_minute": "a public server limits each client's requests",
    },
}


@pytest.fixture()
def serve_app():
    import serve.app  # an installed package (pyproject), like dermaid

    return serve.app


def _app_args_in(relative: str) -> dict:
    """The `args` of the one application in a Serve config file (or the RayService's serveConfigV2)."""
    raw = yaml.safe_load((REPO / relative).read_text())
    if raw.get("kind") == "RayService":
        raw = yaml.safe_load(raw["spec"]["serveConfigV2"])
    (app,) = raw["applications"]
    return app["args"]


def _conf_serve_args() -> dict:
    """conf/serve.yaml composed and resolved, restricted to AppArgs' keys."""
    from dermaid.config import compose, to_plain
    from serve.args import AppArgs

    plain = to_plain(compose("serve", ["checkpoint=/c"]))
    return {key: plain[key] for key in AppArgs.model_fields if key in plain}


def _differences(values: dict, defaults: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (value, default)} for every value in `values` that is not its default; nested where the
    default is a nested model (a dict), whole where it is a value (autoscaling_config, a list)."""
    found = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            found[path] = (value, "<not an AppArgs key>")
        elif isinstance(defaults[key], dict) and isinstance(value, dict) and defaults[key]:
            found.update(_differences(value, defaults[key], f"{path}."))
        elif value != defaults[key]:
            found[path] = (value, defaults[key])
    return found


def _schemas(app, name: str = "dermaid") -> dict:
    from dermaid.ray_compat import deployment_schemas

    return {d.name: d for d in deployment_schemas(app, name)}


def test_serve_config_file_is_valid_and_builds(serve_app, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from dermaid.ray_compat import build_serve_app

    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app_cfg,) = ServeDeploySchema.model_validate(raw).applications
    assert app_cfg.import_path == "serve.app:build_app"
    args = copy.deepcopy(raw["applications"][0]["args"])
    app, schemas = build_serve_app(serve_app.build_app, args, "dermaid")  # Serve's own typed-args path
    deployments = {d.name: d for d in schemas}
    assert set(deployments) == {"Classifier", "Explainer", "Ingress"}
    classifier = deployments["Classifier"]
    wait_s = raw["applications"][0]["args"]["classifier"]["batch_wait_timeout_s"]
    assert {k: v for k, v in classifier.user_config.items() if k != "model"} == {"max_batch_size": 8,
                                                                                "batch_wait_timeout_s": wait_s}
    assert classifier.user_config["model"] == {"checkpoint": str(REPO / "runs/toy/best"), "version": None}
    assert classifier.max_queued_requests == 64  # a full queue: 503 + Retry-After (serve/ingress.py)
    assert classifier.user_config["batch_wait_timeout_s"] <= 0.005  # a long wait costs p50 at low load
    assert classifier.ray_actor_options.num_cpus == 1.0 and classifier.max_ongoing_requests == 32
    assert deployments["Ingress"].ray_actor_options.num_cpus == 0.25


def test_relative_paths_are_pinned_and_autoscaling_replaces_replicas(serve_app, tmp_path, monkeypatch):
    from serve.args import AppArgs

    monkeypatch.chdir(tmp_path)
    args = AppArgs.model_validate({
        "checkpoint": "runs/x/best", "storage": {"url": "up"},
        "classifier": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}, "num_cpus": 0.5},
    })
    assert args.checkpoint == str(tmp_path / "runs/x/best") and args.storage.url == str(tmp_path / "up")
    assert AppArgs.model_validate({"checkpoint": "gs://b/ckpt"}).checkpoint == "gs://b/ckpt"
    deployments = _schemas(serve_app.build_app(args))
    assert deployments["Classifier"].autoscaling_config.max_replicas == 3
    assert deployments["Classifier"].ray_actor_options.num_cpus == 0.5


@pytest.mark.parametrize("bad, match", [
    ({"malignant_codes": ["MEL", "XYZ"]}, "XYZ"),
    ({"triage": {"high": 0.1, "moderate": 0.5}}, "moderate <= high"),
    ({"classifier": {"max_batch": 4}}, "max_batch"),
])
def test_bad_app_args_are_rejected(bad, match):
    from pydantic import ValidationError

    from serve.args import AppArgs

    with pytest.raises(ValidationError, match=match):
        AppArgs.model_validate({"checkpoint": "/c", **bad})


def test_conf_serve_yaml_is_app_args_plus_server_keys(tmp_path):
    from dermaid.config import compose
    from serve.args import AppArgs
    from serve.launcher import build_app_args, build_server_args

    cfg = compose("serve", [f"checkpoint={tmp_path}/ckpt", "classifier.max_batch_size=4", "port=9000"])
    server_keys = set(build_server_args(cfg).model_dump()) | {"paths"}
    assert set(cfg) - server_keys <= set(AppArgs.model_fields)
    args = build_app_args(cfg)
    assert args.classifier.max_batch_size == 4 and args.max_upload_mb == 20
    assert build_server_args(cfg).port == 9000
    with pytest.raises(DermaidError, match="classifier.num_cpus"):
        build_app_args(compose("serve", [f"checkpoint={tmp_path}", "classifier.num_cpus=lots"]))
    with pytest.raises(DermaidError, match="port"):
        build_server_args(compose("serve", [f"checkpoint={tmp_path}", "port=eighty"]))


@pytest.mark.parametrize("relative", sorted(DELIBERATE_OVERRIDES))
def test_every_serve_default_is_app_args_or_a_listed_override(relative):
    """conf/serve.yaml, serve/config.yaml and the RayService repeat AppArgs' defaults for their readers; a
    value that drifts from serve/args.py fails here unless DELIBERATE_OVERRIDES lists it with a reason."""
    from serve.args import AppArgs

    values = _conf_serve_args() if relative == "conf/serve.yaml" else _app_args_in(relative)
    values = {key: value for key, value in values.items() if key != "checkpoint"}  # required: no default
    model = {} if values.get("model_url") else {"checkpoint": "/c"}  # one of the two is required
    AppArgs.model_validate({**model, **values})  # the keys and values are valid app args
    defaults = AppArgs.model_construct(checkpoint="/c").model_dump()  # unvalidated: storage.url as written
    differences = _differences(values, defaults)
    listed = DELIBERATE_OVERRIDES[relative]
    unlisted = {key: diff for key, diff in differences.items() if key not in listed}
    assert not unlisted, f"{relative}: (value, AppArgs default) differ; fix one or list the override: {unlisted}"
    assert set(listed) <= set(differences), f"{relative}: listed overrides now equal the default: " \
                                            f"{set(listed) - set(differences)}"


def test_conf_serve_yaml_and_serve_config_listen_alike():
    from dermaid.config import compose

    cfg = compose("serve", ["checkpoint=/c"])
    raw = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app,) = raw["applications"]
    assert (cfg.host, cfg.port, cfg.app_name) == (raw["http_options"]["host"], raw["http_options"]["port"],
                                                  app["name"])


def test_importing_the_app_runs_nothing():
    code = ("import serve.app, serve.classifier, ray; "
            "assert not ray.is_initialized(); assert serve.classifier.Classifier.name == 'Classifier'")
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True, timeout=300)  # importable from anywhere


def test_dermaid_serve_with_a_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch, dermaid_cli):
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))
    proc = dermaid_cli("serve", f"checkpoint={tmp_path}/nothing", cwd=tmp_path)
    assert proc.returncode == 2 and "error:" in proc.stderr and "nothing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_saliency_weights_of_a_compressed_checkpoint_are_its_float_source(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         dermaid_cli):
    """An ONNX/int8 artifact names its float source; without one (or with it gone) the error says what to set."""
    import json
    import shutil

    from dermaid.models.card import CheckpointError, float_weights_for

    assert float_weights_for(tiny_checkpoint) == tiny_checkpoint
    artifact = tmp_path / "best-onnx"
    shutil.copytree(tiny_checkpoint, artifact)
    card = json.loads((artifact / "card.json").read_text())
    card.update(kind="onnx", compression={"source": tiny_checkpoint, "format": "onnx"})
    (artifact / "card.json").write_text(json.dumps(card))
    assert float_weights_for(str(artifact)) == tiny_checkpoint
    card["compression"]["source"] = str(tmp_path / "gone")
    (artifact / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="explainer_checkpoint="):
        float_weights_for(str(artifact))
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))  # `dermaid serve` says so before it starts Ray
    proc = dermaid_cli("serve", f"checkpoint={artifact}", cwd=tmp_path)
    assert proc.returncode == 2 and "explainer_checkpoint=" in proc.stderr and "gone" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_forward_lanes_give_a_lone_forward_every_thread_and_keep_one_openmp_team():
    import asyncio
    import threading

    import torch

    both_started = threading.Barrier(2, timeout=60)

    def forward(wait_for_the_other: bool) -> tuple[int, int]:
        threads = torch.get_num_threads()  # what this forward runs with
        if wait_for_the_other:
            both_started.wait()
        return threads, threading.get_ident()

    from serve.lanes import ForwardLanes

    lanes = ForwardLanes(forward, lanes=2, torch_threads=2)
    callers_threads = torch.get_num_threads()
    warmed = lanes.warmup(threading.get_ident)  # the thread where the warm-up forward builds the team

    async def scenario() -> tuple[tuple, list[tuple], tuple]:
        alone = await lanes.run(False)
        together = await asyncio.gather(lanes.run(True), lanes.run(True))
        alone_again = await lanes.run(False)
        return alone, sorted(together), alone_again

    alone, together, alone_again = asyncio.run(scenario())
    assert alone == (2, warmed) and alone_again == (2, warmed)   # lane 0, where the warm-up built the team
    assert [threads for threads, _ in together] == [1, 2]       # the second starts beside the first
    assert {ident for threads, ident in [alone, *together, alone_again] if threads > 1} == {warmed}
    assert len({ident for _, ident in together}) == 2
    assert torch.get_num_threads() == callers_threads  # lanes size only their own threads' teams
