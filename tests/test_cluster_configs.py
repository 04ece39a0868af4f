"""Offline checks of the cluster side (cluster/, .github/workflows/, environment.yml).

No cloud is reachable from the tests, so they check what can be checked here: every manifest
parses and names the project's Ray version and image; the GCP launcher config passes Ray's own
schema validation; each RayJob entrypoint composes as a Hydra command (run in-process); the RayService's
`import_path` + `args` build the Serve application (without starting Ray); the Dockerfile pins the
same Ray and copies files that exist; the workflows and the conda environment do what the README
says.

    .venv/bin/python -m pytest tests/test_cluster_configs.py -q
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import shlex
import string
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"

# The values `render` (cluster/README.md) substitutes; the tests use fake but well-formed ones.
PLACEHOLDERS = {
    "PROJECT_ID": "test-project",
    "REGION": "us-central1",
    "ZONE": "us-central1-a",
    "BUCKET": "test-bucket",
    "IMAGE_TAG": "0.0.0-test",
    "DERMAID_DATABASE_URL": "postgresql+psycopg2://dermaid:test@10.0.0.5:5432/dermaid",
    "REDIS_ADDRESS": "10.0.0.7:6379",
    "DERMAID_HOST": "dermaid.example.org",
    "ACME_EMAIL": "ops@example.org",
}
PROJECT_IMAGE = "us-central1-docker.pkg.dev/test-project/dermaid/dermaid:0.0.0-test"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
# Strict JSON schemas of the custom kinds, converted from their projects' CRDs (tests/k8s_schemas/vendor_crds.py);
# Kubernetes' own kinds come from the kubernetes-validate package, at the version GKE's regular channel runs.
CRD_SCHEMAS = REPO / "tests" / "k8s_schemas"
KUBERNETES_VERSION = "1.33"


def _render(path: Path) -> str:
    """The file as `envsubst` fills it: only our ${NAME} placeholders, never $RAY_HEAD_IP or ${hydra.key}."""
    return string.Template(path.read_text()).safe_substitute(PLACEHOLDERS)


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(path)) if doc is not None]


def _ray_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, doc) for p in MANIFESTS for doc in _load_all(p) if doc.get("kind") in RAY_KINDS]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


def _pod_specs(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, pod spec) for the head and every worker group."""
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, group, group["template"]["spec"]) for name, group in groups]


def _rayjobs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, doc) for p, doc in _ray_resources() if doc["kind"] == "RayJob"]


def _serve_config() -> dict[str, Any]:
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("6", "500m", 2) in cores."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _worker_groups(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray's view of each worker group: logical CPUs and GPUs per pod, and the most pods."""
    groups = []
    for name, spec, pod in _pod_specs(cluster)[1:]:
        limits = pod["containers"][0]["resources"]["limits"]
        params = spec.get("rayStartParams") or {}
        groups.append({
            "name": name,
            "CPU": float(params.get("num-cpus", _quantity(limits["cpu"]))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            "max": int(spec["maxReplicas"]),
        })
    return groups


def _capacity(groups: list[dict[str, Any]], cpu: float, gpu: float) -> float:
    """How many (cpu, gpu) bundles the groups hold when every group is at its maximum size."""
    total = 0.0
    for group in groups:
        per_node = min(group["CPU"] // cpu if cpu else math.inf, group["GPU"] // gpu if gpu else math.inf)
        total += per_node * group["max"] if per_node else 0
    return total


def _scalings(cfg: Any) -> list[dict[str, Any]]:
    """Every Ray Train ScalingConfig group (a dict with num_workers and use_gpu) inside a composed config."""
    if isinstance(cfg, dict):
        own = [cfg] if {"num_workers", "use_gpu"} <= cfg.keys() else []
        return own + [s for value in cfg.values() for s in _scalings(value)]
    if isinstance(cfg, list):
        return [s for value in cfg for s in _scalings(value)]
    return []


def _fits(scaling: dict[str, Any], groups: list[dict[str, Any]]) -> bool:
    cpu = float(scaling.get("cpus_per_worker", 1))
    gpu = float(scaling.get("gpus_per_worker", 1)) if scaling["use_gpu"] else 0.0
    return _capacity(groups, cpu, gpu) >= int(scaling["num_workers"])


# Manifests


def test_every_manifest_parses_and_the_expected_resources_exist():
    kinds: dict[str, list[str]] = {}
    for path in MANIFESTS:
        for doc in _load_all(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name}: not a Kubernetes object"
            kinds.setdefault(doc["kind"], []).append(path.name)
    assert len(kinds.get("RayCluster", [])) == 1
    assert len(kinds.get("RayService", [])) == 1
    commands = sorted(shlex.split(doc["spec"]["entrypoint"])[1] for _, doc in _rayjobs())
    assert commands == ["pipeline", "train", "tune"]
    assert kinds.get("Secret") == ["secrets.template.yaml"], "secrets belong in the template only"


def _crd_schema(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The vendored schema of a custom kind (None: one of Kubernetes' own, which kubernetes-validate knows)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    path = CRD_SCHEMAS / f"{doc['kind'].lower()}-{group.split('.')[0]}-{version}.json"
    return json.loads(path.read_text()) if group and path.exists() else None


def _pod_templates(value: Any, schema: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """(path, template) of every pod template the vendored schema marks (vendor_crds.POD_TEMPLATE_MARK)."""
    if schema.get("x-dermaid-pod-template"):
        return [(where, value)]
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if isinstance(sub, dict):
                found += _pod_templates(item, sub, f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _pod_templates(item, schema["items"], f"{where}[{i}]")
    return found


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one manifest: the kind's own schema (unknown fields are errors), and for the
    Ray kinds each embedded pod template against Kubernetes' strict PodTemplate schema."""
    import jsonschema
    import kubernetes_validate

    def k8s(obj: dict[str, Any], label: str) -> list[str]:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{label}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
        except kubernetes_validate.SchemaNotFoundError as exc:  # a custom kind: vendor its CRD (vendor_crds.py)
            return [f"{label}: {exc.message}"]
        return []

    schema = _crd_schema(doc)
    if schema is None:
        return k8s(doc, doc["kind"])
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    for where, template in _pod_templates(doc, schema, doc["kind"]):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        errors += k8s(wrapped, where)
    return errors


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_validates_against_its_kinds_schema(path: Path):
    for doc in _load_all(path):
        errors = _schema_errors(doc)
        assert not errors, f"{path.name} {doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}:\n" + "\n".join(errors)


def test_schema_validation_catches_a_typo_and_a_wrong_type():
    """The validator is strict: a misspelt field or a wrong type in a Ray kind or its pod template fails."""
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    assert _schema_errors(service) == []
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert any("enableInTreeAutoscalling" in e for e in _schema_errors(typo))
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert any("containerPort" in e for e in _schema_errors(wrong))
    policy = copy.deepcopy(_network_policy())
    policy["spec"]["policyType"] = ["Ingress"]
    assert _schema_errors(policy)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_names_the_project_ray_version_and_image(path: Path):
    docs = [doc for doc in _load_all(path) if doc.get("kind") in RAY_KINDS]
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        cluster = _cluster_spec(doc)
        assert cluster["rayVersion"] == ray.__version__, (
            f"{path.name}: rayVersion {cluster['rayVersion']} but the project's Ray is {ray.__version__}"
        )
        for group, _, pod in _pod_specs(cluster):
            images = {c["image"] for c in pod["containers"]}
            assert images == {PROJECT_IMAGE}, f"{path.name}/{group}: images {images}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_pods_get_settings_secrets_and_fitting_resources(path: Path):
    for doc in [d for d in _load_all(path) if d.get("kind") in RAY_KINDS]:
        cluster = _cluster_spec(doc)
        assert cluster.get("enableInTreeAutoscaling") is True, f"{path.name}: worker groups must autoscale"
        for group, spec, pod in _pod_specs(cluster):
            where = f"{path.name}/{group}"
            ray_container = pod["containers"][0]
            assert ray_container["name"] == ("ray-head" if group == "head" else "ray-worker"), where
            assert pod["serviceAccountName"] == "dermaid-ray", where
            sources = {
                (kind, ref["name"]) for c in pod["containers"] for e in c.get("envFrom", []) for kind, ref in e.items()
            }
            assert sources == {("configMapRef", "dermaid-config"), ("secretRef", "dermaid-secrets")}, where
            resources = ray_container["resources"]
            assert resources["requests"] == resources["limits"], f"{where}: requests must equal limits (Ray sizes from them)"
            gpus = int(resources["limits"].get("nvidia.com/gpu", 0))
            if gpus:
                assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-"), where
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            if group != "head":
                assert 0 <= spec["minReplicas"] <= spec["replicas"] <= spec["maxReplicas"], where


def test_config_map_points_dermaid_at_the_bucket():
    (config_map,) = [d for d in _load_all(KUBERAY / "config.yaml") if d["kind"] == "ConfigMap"]
    assert config_map["metadata"]["name"] == "dermaid-config"
    assert config_map["data"]["DERMAID_HOME"] == "gs://test-bucket"
    assert all(isinstance(v, str) for v in config_map["data"].values()), "ConfigMap values must be strings"


def test_secret_template_holds_placeholders_only():
    (secret,) = _load_all(KUBERAY / "secrets.template.yaml")
    assert secret["metadata"]["name"] == "dermaid-secrets"
    assert "data" not in secret, "base64 `data` would hide real values; use stringData placeholders"
    assert {"DERMAID_DATABASE_URL", "DERMAID_REVIEWER_TOKENS", "JUPYTER_TOKEN", "WANDB_API_KEY"} <= secret["stringData"].keys()
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key} must be a placeholder, not a real value"


@pytest.mark.parametrize("path", [*MANIFESTS, CLUSTER / "gcp.yaml"], ids=lambda p: p.name)
def test_placeholders_are_the_documented_ones(path: Path):
    """Every ${NAME} in a file is one `render` fills, and the file's own envsubst line lists them all."""
    text = path.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert used <= PLACEHOLDERS.keys(), f"{path.name}: unknown placeholders {used - PLACEHOLDERS.keys()}"
    if not used:
        return
    listed = re.search(r"envsubst '([^']*)'", text)
    assert listed, f"{path.name}: header lacks the envsubst command that renders it"
    assert used <= {v.lstrip("$") for v in listed.group(1).split()}, f"{path.name}: envsubst line misses some of {used}"


def test_readme_render_fills_every_placeholder():
    readme = (CLUSTER / "README.md").read_text()
    assert "envsubst '" + " ".join(f"${k}" for k in PLACEHOLDERS) + "'" in readme



# Ray's control plane: token authentication on, the dashboard and Jobs API inside the cluster

RAY_CONTROL_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001}  # remote code execution by design
SERVE_PORT = 8000
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay Helm chart's pod label


def test_every_ray_cluster_requires_rays_token():
    """authOptions mode token (KubeRay 1.5.1+ makes the token Secret and gives it to the Ray containers, the
    job submitter and itself); a container beside Ray that joins the cluster reads the same Secret."""
    for path, doc in _ray_resources():
        cluster = _cluster_spec(doc)
        assert cluster.get("authOptions") == {"mode": "token"}, f"{path.name}: Ray token authentication is off"
        for group, _, pod in _pod_specs(cluster):
            for container in pod["containers"][1:]:
                env = {e["name"]: e for e in container.get("env", [])}
                if "RAY_ADDRESS" not in env:
                    continue
                where = f"{path.name}/{group}/{container['name']}"
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert secret == {"name": doc["metadata"].get("name"), "key": "auth_token"}, where  # KubeRay's Secret


def test_gcp_launcher_cluster_requires_rays_token():
    config = yaml.safe_load(_render(CLUSTER / "gcp.yaml"))
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}  # `ray get-auth-token --generate`
    assert "ray get-auth-token --generate" in (CLUSTER / "gcp.yaml").read_text()


def _network_policy() -> dict[str, Any]:
    (policy,) = [doc for doc in _load_all(KUBERAY / "networkpolicy.yaml") if doc["kind"] == "NetworkPolicy"]
    return policy


def _sources(policy: dict[str, Any], port: int, name: str) -> list[Any]:
    """The `from` lists of the policy's ingress rules that admit TCP `port` (None: a rule open to anyone)."""
    sources = []
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (port, name) and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        sources.append(rule.get("from"))
    return sources


def _pod_labels() -> list[tuple[str, dict[str, str]]]:
    """(where, labels) of every pod template the Ray resources make, the RayJobs' submitters included."""
    found = []
    for path, doc in _ray_resources():
        for group, spec, _ in _pod_specs(_cluster_spec(doc)):
            found.append((f"{path.name}/{group}", spec["template"]["metadata"]["labels"]))
        if doc["kind"] == "RayJob":
            found.append((f"{path.name}/submitter", doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]))
    return found


def test_network_policy_keeps_the_dashboard_and_jobs_api_inside_the_cluster():
    policy = _network_policy()
    spec = policy["spec"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and "Ingress" in spec["policyTypes"]
    selector = spec["podSelector"]["matchLabels"]
    assert selector and not spec["podSelector"].get("matchExpressions")
    for where, labels in _pod_labels():
        assert selector.items() <= labels.items(), f"{where}: not selected by the NetworkPolicy"
    for path, doc in _ray_resources():  # the policy's port numbers are the ones the pods declare
        for group, _, pod in _pod_specs(_cluster_spec(doc)):
            for port in pod["containers"][0].get("ports", []):
                if port["name"] in RAY_CONTROL_PORTS:
                    assert port["containerPort"] == RAY_CONTROL_PORTS[port["name"]], f"{path.name}/{group}"

    for name, port in RAY_CONTROL_PORTS.items():
        sources = _sources(policy, port, name)
        assert sources and None not in sources, f"{name} ({port}): open to anyone"
        for peer in [peer for source in sources for peer in source]:
            assert "ipBlock" not in peer, f"{name} ({port}): admits addresses {peer['ipBlock']}"
            labels = peer.get("podSelector", {}).get("matchLabels") or {}
            if "namespaceSelector" in peer:  # another namespace: only the operator's pods
                assert labels == OPERATOR, f"{name} ({port}): admits whole namespaces: {peer}"
            else:                            # this namespace: only DermAID's own Ray pods
                assert labels.items() >= selector.items(), f"{name} ({port}): admits other pods: {peer}"
    operator_ports = {p["port"] for rule in spec["ingress"] for peer in rule.get("from") or []
                      if peer.get("podSelector", {}).get("matchLabels") == OPERATOR for p in rule.get("ports") or []}
    assert operator_ports == {RAY_CONTROL_PORTS["dashboard"]}, "KubeRay needs the dashboard, and only that"
    assert None in _sources(policy, SERVE_PORT, "serve"), "the Serve API must stay reachable"
    jupyter = _sources(policy, 8888, "jupyter")  # JupyterLab: only the Ray pods; people port-forward
    assert jupyter == [[{"podSelector": {"matchLabels": selector}}]], jupyter


def test_rayjob_submitters_are_kuberays_default_with_our_label():
    for path, doc in _rayjobs():
        template = doc["spec"]["submitterPodTemplate"]
        (container,) = template["spec"]["containers"]
        assert container["image"] == PROJECT_IMAGE, path.name
        assert not container.get("command") and not container.get("args"), f"{path.name}: KubeRay writes the command"
        assert template["spec"]["restartPolicy"] == "Never" and template["spec"]["serviceAccountName"] == "dermaid-ray"


# RayJob entrypoints: each is one Hydra command that composes


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob-")], ids=lambda p: p.name)
def test_rayjob_spec_and_entrypoint_composes(path: Path, tmp_path, monkeypatch, dermaid_cli):
    (job,) = [doc for doc in _load_all(path) if doc["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert job["metadata"]["generateName"].startswith("dermaid-")
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "dermaid" and not ({";", "&&", "||", "|"} & set(argv)), "one dermaid command, no shell chains"
    monkeypatch.setenv("DERMAID_HOME", "gs://test-bucket")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.delenv("DERMAID_CONF", raising=False)
    done = dermaid_cli(*argv[1:], "--cfg", "job", "--resolve", cwd=tmp_path)  # the command, in this process
    assert done.returncode == 0, f"{spec['entrypoint']!r} does not compose:\n{done.stderr[-3000:]}"
    cfg = yaml.safe_load(done.stdout)
    assert "gs://test-bucket" in yaml.safe_dump(cfg), "the job must write to the bucket (DERMAID_HOME)"
    groups = _worker_groups(spec["rayClusterSpec"])
    for scaling in _scalings(cfg):
        assert _fits(scaling, groups), f"{path.name}: {scaling} does not fit the worker groups {groups}"


# RayService: the Serve config is valid and its import path + args build the app


def test_serve_config_validates_against_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(_serve_config())
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    assert app.route_prefix == "/"
    assert app.args["storage"]["url"] == "gs://test-bucket/uploads"
    assert app.args["storage"]["db_url"] == PLACEHOLDERS["DERMAID_DATABASE_URL"]


@pytest.fixture(scope="module")
def production_registry(promotable_checkpoint, tmp_path_factory) -> str:
    """A local registry whose `dermaid` model has a production stage: what the RayService's model_url names."""
    from dermaid.registry import Registry

    root = str(tmp_path_factory.mktemp("registry"))
    registry = Registry(root)
    registry.register(promotable_checkpoint, "dermaid", "v1")
    registry.promote("dermaid", "v1")
    return root


def _build_serve_app(tmp_path, registry_root: str) -> tuple[Any, list[Any]]:
    """What `serve deploy` / KubeRay do with import_path + args, short of deploying: -> (app, DeploymentSchemas).

    Building resolves the registry stage and migrates the uploads database the args name (serve.app.build_app); the
    rendered bucket and database host do not exist here, so a local registry and SQLite file stand in for them
    (every other argument as the manifest has it)."""
    from dermaid.ray_compat import build_serve_app

    (app_cfg,) = _serve_config()["applications"]
    module_name, attr = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    args = copy.deepcopy(app_cfg.get("args", {}))
    assert args["storage"]["db_url"] == PLACEHOLDERS["DERMAID_DATABASE_URL"]
    assert args["registry_root"] == "gs://test-bucket/registry" and args["model_url"] == "registry://dermaid/production"
    args["storage"]["db_url"] = f"sqlite:///{tmp_path}/uploads.db"
    args["registry_root"] = registry_root
    return build_serve_app(builder, args, app_cfg["name"])


def test_rayservice_import_path_and_args_build_the_app(tmp_path, production_registry):
    from ray.serve.deployment import Application

    was_running = ray.is_initialized()
    app, deployments = _build_serve_app(tmp_path, production_registry)
    assert isinstance(app, Application)
    names = {d.name for d in deployments}
    assert {"Classifier", "Explainer", "Ingress"} <= names
    (app_cfg,) = _serve_config()["applications"]
    configured = {d["name"] for d in app_cfg.get("deployments", [])}
    assert configured <= names, f"serveConfigV2 names deployments the app lacks: {configured - names}"
    for d in deployments:
        scaling = d.autoscaling_config
        assert scaling and scaling.min_replicas >= 1 and scaling.max_replicas > scaling.min_replicas, (
            f"{d.name}: autoscaling replicas with a warm one"
        )
    assert ray.is_initialized() == was_running, "building the app must not start Ray"


def test_rayservice_replicas_fit_its_worker_groups(tmp_path, production_registry):
    """Every replica fits a pod, and all CPU replicas at their maximum fit the CPU group at its maximum."""
    _, deployments = _build_serve_app(tmp_path, production_registry)
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    groups = _worker_groups(service["spec"]["rayClusterConfig"])
    needed = 0.0
    for d in deployments:
        cpus = d.ray_actor_options.num_cpus if d.ray_actor_options.num_cpus is not None else 1.0  # Serve's default
        gpus = d.ray_actor_options.num_gpus or 0.0
        assert _capacity(groups, cpus, gpus) >= 1, f"{d.name}: one replica fits no pod"
        if not gpus:
            needed += cpus * d.autoscaling_config.max_replicas
    available = sum(g["CPU"] * g["max"] for g in groups if not g["GPU"])
    assert needed <= available, f"{needed} CPUs of replicas at full scale exceed the CPU group's {available}"


# GCP cluster launcher


def test_gcp_launcher_config_passes_rays_validation():
    from dermaid.ray_compat import validate_cluster_launcher

    config = yaml.safe_load(_render(CLUSTER / "gcp.yaml"))
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"} <= config.keys()
    assert config["provider"]["type"] == "gcp"
    assert config["provider"]["project_id"] == "test-project"
    assert config["docker"]["image"] == PROJECT_IMAGE and config["docker"]["container_name"]
    assert config["idle_timeout_minutes"] > 0
    validate_cluster_launcher(copy.deepcopy(config))  # Ray's own schema + consistency checks

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())
    gpus_per_machine = {"g2-standard-8": 1, "a2-highgpu-4g": 4}
    machines = {t["node_config"]["machineType"] for t in workers.values()}
    assert set(gpus_per_machine) <= machines, "an L4 and a 4xA100 worker type"
    for name, node_type in types.items():
        machine = node_type["node_config"]["machineType"]
        assert node_type["resources"].get("GPU", 0) == gpus_per_machine.get(machine, 0), f"{name}: GPU count"
        scheduling = node_type["node_config"].get("scheduling", {})
        assert isinstance(scheduling, dict), f"{name}: GCE's scheduling is an object, not a list"
        if machine in gpus_per_machine:
            assert scheduling["onHostMaintenance"] == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"
        if name != config["head_node_type"]:
            assert node_type["min_workers"] == 0, f"{name}: scales from zero"

    groups = [{"name": n, "CPU": t["resources"].get("CPU", 0), "GPU": t["resources"].get("GPU", 0), "max": t["max_workers"]}
              for n, t in workers.items()]
    for path in sorted((REPO / "conf" / "scaling").glob("*.yaml")):
        scaling = yaml.safe_load(path.read_text())
        assert _fits(scaling, groups), f"scaling={path.stem} does not fit gcp.yaml's worker types"


# Dockerfile


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def test_dockerfile_base_image_is_the_project_ray():
    text = _dockerfile()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1) == ray.__version__
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-" + py + r"-\$\{RAY_PLATFORM\}", base), base
    assert re.search(r"^ARG RAY_PLATFORM=(gpu|cu\d+)$", text, re.M), "the default image must carry CUDA"
    assert "ENV DERMAID_SRC" in text and "DERMAID_CONF=/home/ray/dermaid/conf" in text


def test_dockerfile_copies_files_that_exist_and_the_context_admits():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            copied += words[:-1]
    assert {"pyproject.toml", "dermaid/", "conf/", "serve/", "notebooks/"} <= set(copied)
    for source in copied:
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert files, f"{source} is empty: git keeps no empty folders, so COPY fails on a fresh clone"
        assert source.rstrip("/") in admitted, f"{source} is excluded from the build context"


# Workflows and the conda environment


def _workflow(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / ".github" / "workflows" / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the bare key `on` as True
    return doc


def test_test_workflow_runs_ci_script_on_python_311():
    doc = _workflow("test.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    (job,) = doc["jobs"].values()
    assert job["runs-on"].startswith("ubuntu")
    steps = job["steps"]
    setup = [s for s in steps if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and str(setup[0]["with"]["python-version"]) == "3.11"
    assert steps[-1]["run"].strip() == "bash .ci/run"


def test_image_workflow_builds_the_dockerfile_on_tags():
    doc = _workflow("image.yml")
    assert doc["on"]["push"]["tags"] == ["v*"]
    assert doc["permissions"]["packages"] == "write"
    (job,) = doc["jobs"].values()
    build = [s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action@")]
    assert build, "docker/build-push-action builds the image"
    assert build[0]["with"]["file"] == "cluster/Dockerfile" and build[0]["with"]["context"] == "."
    assert build[0]["with"]["push"] is True


def test_conda_environment_installs_this_package_with_dev_extras():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    (pip,) = [d["pip"] for d in deps if isinstance(d, dict)]
    assert "-e .[dev,postgres,lab]" in pip and "-c constraints.txt" in pip, pip  # what `make setup` installs


def test_readme_walks_through_every_step_and_names_existing_files():
    readme = (CLUSTER / "README.md").read_text()
    for step in ("gcloud services enable", "docker build -f cluster/Dockerfile", "docker push", "ray up",
                 "kubectl apply", "kubectl create", "ray job submit", "serve deploy", "port-forward",
                 "ray down", "clusters delete", "gcloud sql instances create", "helm install"):
        assert step in readme, f"cluster/README.md lacks `{step}`"
    for folder in ("data/isic2019/", "data/prepared/", "runs/", "registry/", "uploads/"):
        assert folder in readme, f"bucket layout lacks {folder}"
    for ref in set(re.findall(r"cluster/[\w./-]+\.(?:yaml|md)|\bkuberay/[\w.-]+\.yaml", readme)):
        path = REPO / ref if ref.startswith("cluster/") else CLUSTER / ref
        assert path.exists(), f"cluster/README.md names {ref}, which does not exist"


# The public entry, fault tolerance, monitoring and schedules


def _docs(name: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _load_all(KUBERAY / name) if doc["kind"] == kind]


def test_gateway_serves_the_one_host_over_https_to_the_rayservice():
    (gateway,) = _docs("gateway.yaml", "Gateway")
    (issuer,) = _docs("gateway.yaml", "ClusterIssuer")
    host = PLACEHOLDERS["DERMAID_HOST"]
    listeners = {item["name"]: item for item in gateway["spec"]["listeners"]}
    assert listeners["https"]["protocol"] == "HTTPS" and listeners["https"]["port"] == 443
    assert {item["hostname"] for item in listeners.values()} == {host}, "one value to set: the host name"
    assert gateway["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == issuer["metadata"]["name"]
    solver = issuer["spec"]["acme"]["solvers"][0]["http01"]["gatewayHTTPRoute"]["parentRefs"][0]
    assert solver["name"] == gateway["metadata"]["name"] and solver["sectionName"] == "http"
    routes = {r["metadata"]["name"]: r for r in _docs("gateway.yaml", "HTTPRoute")}
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    api = [r for r in routes.values() if r["spec"]["parentRefs"][0].get("sectionName") == "https"]
    (backend,) = [b for route in api for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backend == {"name": f"{service['metadata']['name']}-serve-svc", "port": SERVE_PORT}
    plain = [r for r in routes.values() if r["spec"]["parentRefs"][0].get("sectionName") == "http"]
    (redirect,) = [f for route in plain for rule in route["spec"]["rules"] for f in rule.get("filters", [])]
    assert redirect["requestRedirect"]["scheme"] == "https"
    assert all("backendRefs" not in rule for route in plain for rule in route["spec"]["rules"]), "no plain-HTTP API"
    args = _serve_config()["applications"][0]["args"]
    assert {"35.191.0.0/16", "130.211.0.0/22"} <= set(args["storage"]["trusted_proxies"]), "the Gateway's proxies"


def test_rayservice_head_is_fault_tolerant_with_external_gcs_storage():
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    options = service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == PLACEHOLDERS["REDIS_ADDRESS"]
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    (secret,) = _load_all(KUBERAY / "secrets.template.yaml")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


def test_podmonitor_scrapes_every_dermaid_ray_pod_and_the_policy_admits_it():
    (monitor,) = _docs("podmonitor.yaml", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for path, doc in _ray_resources():
        for group, spec, _ in _pod_specs(_cluster_spec(doc)):
            labels = spec["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{path.name}/{group}: not scraped"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # KubeRay's name for Ray's metrics-export port 8080
    scrapers = _sources(_network_policy(), 8080, "metrics")
    prometheus = [peer for peers in scrapers if peers for peer in peers
                  if peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "prometheus"}]
    assert prometheus, "Prometheus may reach port 8080"


def test_grafana_dashboard_plots_exactly_the_served_metrics():
    from serve.metrics import METRIC_NAMES, METRICS

    dashboard = json.loads((CLUSTER / "grafana" / "dermaid-serve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in re.findall(r"\bray_dermaid_\w+", expr)}
    assert used and used <= set(METRIC_NAMES), f"panels name metrics the service does not export: {used - set(METRIC_NAMES)}"
    plotted = {name for name in METRICS if any(series.startswith(f"ray_{name}") for series in used)}
    assert plotted == set(METRICS), f"metrics without a panel: {set(METRICS) - plotted}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("name", ["dermaid-monitoring-report", "dermaid-uploads-purge"])
def test_scheduled_jobs_run_one_dermaid_command_that_composes(name: str, tmp_path, monkeypatch, dermaid_cli):
    (job,) = [doc for doc in _docs("schedules.yaml", "CronJob") if doc["metadata"]["name"] == name]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == PROJECT_IMAGE and pod["serviceAccountName"] == "dermaid-ray"
    argv = container["args"]
    assert argv[0] == "dermaid" and not container.get("command")
    monkeypatch.setenv("DERMAID_HOME", "gs://test-bucket")
    done = dermaid_cli(*argv[1:], "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, f"{argv} does not compose:\n{done.stderr[-3000:]}"


def test_purge_schedule_keeps_what_the_service_promises():
    (job,) = [doc for doc in _docs("schedules.yaml", "CronJob") if doc["metadata"]["name"] == "dermaid-uploads-purge"]
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    days = dict(arg.split("=", 1) for arg in container["args"] if "=" in arg)["storage.retention_days"]
    stated = _serve_config()["applications"][0]["args"]["storage"]["retention_days"]
    assert float(days) == float(stated), "the purge must delete what the privacy note says is deleted"


def test_promote_workflow_promotes_waits_for_the_version_and_rolls_back(tmp_path, monkeypatch, dermaid_cli):
    """The CD workflow's dermaid commands compose (in this process) with the values the workflow gives them."""
    doc = _workflow("promote.yml")
    assert {"workflow_dispatch", "repository_dispatch"} <= set(doc["on"])
    (job,) = doc["jobs"].values()
    env = {key: f"test-{key.lower()}" for key in job["env"]}
    env["REGISTRY"] = str(tmp_path / "registry")
    runs = [step for step in job["steps"] if "dermaid registry" in step.get("run", "")]
    assert [s["run"].split()[2] for s in runs] == ["promote", "rollback"]
    assert runs[-1]["if"] == "failure()"
    rollouts = [step["run"] for step in job["steps"] if "python -m serve.rollout" in step.get("run", "")]
    assert len(rollouts) == 2 and all("kubectl patch rayservice dermaid-api --type merge" in r for r in rollouts)
    monkeypatch.setenv("DERMAID_HOME", str(tmp_path))
    for step in runs:
        line = re.sub(r"\$\{\{[^}]*\}\}", "ci", string.Template(step["run"].splitlines()[0]).safe_substitute(env))
        argv = shlex.split(line)
        done = dermaid_cli(*argv[1:], "--cfg", "job", cwd=tmp_path)
        assert done.returncode == 0, f"{line!r} does not compose:\n{done.stderr[-3000:]}"
    waits = [step["run"] for step in job["steps"] if "/v1/model" in step.get("run", "")]
    assert waits and "$VERSION" in waits[0], "the workflow waits for the public API to name the new version"


def test_rollout_moves_only_the_deployments_user_config_to_the_promoted_version(tmp_path, promotable_checkpoint):
    """serve/rollout.py: after a promotion the RayService's patch names the new version in the Classifier's
    user_config and leaves the app's args untouched (Serve then reconfigures live replicas, no restart)."""
    from ray.serve.schema import ServeDeploySchema

    from dermaid.registry import Registry
    from serve.rollout import rollout_patch

    production_registry = str(tmp_path / "registry")
    Registry(production_registry).register(promotable_checkpoint, "dermaid", "v1")
    Registry(production_registry).promote("dermaid", "v1")
    (service,) = [doc for _, doc in _ray_resources() if doc["kind"] == "RayService"]
    service = copy.deepcopy(service)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["registry_root"] = production_registry
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    def served_after_rollout() -> tuple[str, dict[str, Any]]:
        patch, (model,) = rollout_patch(copy.deepcopy(service))
        (app,) = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"]
        assert app["args"] == config["applications"][0]["args"], "the args must not change (a change restarts replicas)"
        ServeDeploySchema.model_validate(yaml.safe_load(patch["spec"]["serveConfigV2"]))
        classifier = {d["name"]: d for d in app["deployments"]}["Classifier"]
        assert classifier["user_config"]["model"]["version"] == model.version
        return model.version, classifier["user_config"]["model"]

    assert served_after_rollout()[0] == "dermaid@v1"
    Registry(production_registry).register(promotable_checkpoint, "dermaid", "v2")
    Registry(production_registry).promote("dermaid", "v2")
    version, model = served_after_rollout()
    assert version == "dermaid@v2" and model["checkpoint"].startswith(production_registry)
