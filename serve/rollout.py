"""Roll a RayService onto what its registry stage names now, without a rebuild or a restart.

    kubectl get rayservice dermaid-api -o json | python -m serve.rollout > /tmp/rollout.json
    kubectl patch rayservice dermaid-api --type merge --patch-file /tmp/rollout.json

A RayService whose app has `model_url: registry://NAME/STAGE` (cluster/kuberay/rayservice.yaml) resolves the stage
when its replicas start. After a promotion (`dermaid registry promote`, .github/workflows/promote.yml) this writes
the model the stage names now into the deployments' user_config in serveConfigV2 and changes nothing else, not even
the app's args: KubeRay applies a changed serveConfigV2 in place, and Serve, seeing only user_config change, calls
reconfigure() on the live replicas, which load the new model beside the old one and switch (serve/classifier.py);
the same thing `dermaid serve` does locally (serve/launcher.py StageFollower). Re-applying rayservice.yaml by hand
drops these user_configs (the replicas go back to the model they were built with): run the rollout again after it.
The output is a JSON merge patch; the promotion's card checks ran when it was promoted.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

from serve.args import AppArgs, ModelSource
from serve.launcher import IMPORT_PATH, app_config


def rollout_patch(rayservice: dict[str, Any]) -> tuple[dict[str, Any], list[ModelSource]]:
    """A RayService (as `kubectl get -o json` prints it) -> (merge patch of spec.serveConfigV2, the models it names).

    Only DermAID apps (import_path serve.app:build_app) that follow a registry stage change; their args stay as they
    are, byte for byte, so Serve reconfigures instead of redeploying."""
    from dermaid.errors import DermaidError

    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    models = []
    for app in config.get("applications", []):
        if app.get("import_path") != IMPORT_PATH:
            continue
        args = AppArgs.model_validate(app.get("args") or {})
        if not args.model_url:
            continue
        model = args.model_source()   # reads the stage pointer: a RegistryError names what is missing
        wanted = {d["name"]: d for d in app_config(app["name"], args, model)["deployments"]}
        deployments = app.setdefault("deployments", [])
        for deployment in deployments:
            if deployment.get("name") in wanted:
                deployment["user_config"] = wanted.pop(deployment["name"])["user_config"]
        deployments.extend(wanted.values())
        models.append(model)
    if not models:
        raise DermaidError("the RayService has no DermAID app with model_url=registry://NAME/STAGE to roll out")
    return {"spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)}}, models


def main() -> None:
    from dermaid.errors import DermaidError

    try:
        patch, models = rollout_patch(json.load(sys.stdin))
    except (DermaidError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    json.dump(patch, sys.stdout)
    for model in models:
        print(f"rollout: {model.version} ({model.checkpoint})", file=sys.stderr)


if __name__ == "__main__":
    main()
