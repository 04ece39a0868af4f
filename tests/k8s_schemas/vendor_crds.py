"""Turn CustomResourceDefinitions into the strict JSON schemas tests/test_cluster_configs.py validates against.

Kubernetes' own kinds (CronJob, NetworkPolicy, ConfigMap, ...) come from the `kubernetes-validate` package.
The custom kinds cluster/ uses come from their projects' CRDs, converted the way kubeconform's
openapi2jsonschema does it (strict: an unknown field is an error, as a typo in a manifest should be) and
stored here as small JSON files, so the tests run offline:

    git clone --branch v1.5.1 https://github.com/ray-project/kuberay                  # the operator cluster/README.md installs
    git clone https://github.com/prometheus-operator/prometheus-operator
    git clone https://github.com/kubernetes-sigs/gateway-api
    git clone https://github.com/cert-manager/cert-manager
    .venv/bin/python tests/k8s_schemas/vendor_crds.py \
        kuberay/ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml \
        prometheus-operator/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml \
        gateway-api/config/crd/standard/gateway.networking.k8s.io_{gateways,httproutes}.yaml \
        cert-manager/deploy/crds/cert-manager.io_clusterissuers.yaml

Pod templates inside the Ray kinds (head, worker groups, a RayJob's submitter) are cut out of the CRD schema
and marked `x-dermaid-pod-template`: the tests validate each one against Kubernetes' own strict PodTemplate
schema instead, which keeps these files small and checks them against the exact Kubernetes version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
POD_TEMPLATE_MARK = "x-dermaid-pod-template"


def _is_pod_template(schema: dict[str, Any]) -> bool:
    """A PodTemplateSpec: {metadata, spec} where spec holds the containers."""
    props = schema.get("properties", {})
    spec = props.get("spec", {}).get("properties", {})
    return "metadata" in props and "containers" in spec


def _strict(schema: Any) -> Any:
    """OpenAPI v3 (a CRD's dialect) -> JSON schema as kubeconform reads it: closed objects, int-or-string."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if _is_pod_template(schema):
        return {"type": "object", POD_TEMPLATE_MARK: True}
    out = {key: _strict(value) for key, value in schema.items() if key not in ("description", "x-kubernetes-validations")}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def vendor(crd_path: Path) -> list[Path]:
    """The CRD's stored version (the one manifests should use) as <kind>-<group first label>-<version>.json."""
    crd = yaml.safe_load(crd_path.read_text())
    kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
    written = []
    for version in crd["spec"]["versions"]:
        if not version.get("storage", False):
            continue
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
        schema["properties"]["kind"] = {"const": kind}
        schema["properties"]["metadata"] = {"type": "object"}  # Kubernetes' ObjectMeta, checked by the API server
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
        schema["$comment"] = f"from {crd_path.name} ({crd['metadata']['name']}), converted by vendor_crds.py"
        out = HERE / f"{kind.lower()}-{group.split('.')[0]}-{version['name']}.json"
        out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
        written.append(out)
    return written


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for path in vendor(Path(arg)):
            print(f"{path.relative_to(HERE.parents[1])}: {path.stat().st_size // 1024} KiB")
