"""The end-to-end pipeline: prepare -> train (or tune) -> evaluate -> reports -> register.

    dermaid pipeline experiment=toy
    dermaid pipeline data.root=gs://bucket/isic2019 scaling=gpu4 model.name=efficientnet_b3 \
        registry.url=gs://bucket/registry
    ray job submit --address http://HEAD:8265 --working-dir . -- dermaid pipeline experiment=toy

Each step's output lives under `pipeline.out/<step>-<key>/`, where the key hashes the step's inputs
(the dataset version and the config that matters to that step). A step whose output exists is
skipped, so re-running an unchanged pipeline only re-prints where everything is. Inside a Ray Job
the driver joins the job's cluster ($RAY_ADDRESS); locally it starts a private Ray.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid import files
from dermaid.classes import DISCLAIMER
from dermaid.config import conf_dir, to_plain

DONE_FILE = "pipeline_step.json"  # written last into a step folder: its presence means the step finished

# train-config keys whose values change the trained model (not where it is written or how it is logged)
_TRAIN_KEYS = ("model", "optim", "augment", "train", "seed")
_IGNORED_TRAIN_KEYS = ("fail_at_epoch", "loader_workers", "torch_threads")


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid pipeline ...`: run every step, print a summary of where the outputs are."""
    summary = run_pipeline(to_plain(cfg))
    print("\npipeline finished:")
    for step, info in summary["steps"].items():
        print(f"  {step:<10} {'skipped (exists)' if info['skipped'] else 'ran':<17} {info['out']}")
    print(f"registered: {summary['registered']}")
    print(DISCLAIMER)
    return summary


def run_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """A plain `pipeline` config -> {steps: {name: {out, skipped, result}}, registered, version}."""
    from dermaid.data.prepare import ensure_prepared
    from dermaid.ray_runtime import ensure_ray

    pipe = config["pipeline"]
    out = files.absolute_url(pipe["out"])
    force = bool(pipe.get("force", False))
    steps: dict[str, dict[str, Any]] = {}
    run_cfg = config.get("run", {})
    ensure_ray(run_cfg.get("ray_address"), run_cfg.get("num_cpus"), log_to_driver=True)

    # 1. prepare: content-addressed already (the version is the hash), so ensure_prepared is the skip
    start = time.time()
    version_url = ensure_prepared(config["data"])
    version = version_url.rstrip("/").rsplit("/", 1)[-1]
    steps["prepare"] = {"out": version_url, "skipped": False, "seconds": round(time.time() - start, 1)}
    data = {**config["data"], "version": version}

    # 2. train (or tune)
    train_key = _key(version, {k: config.get(k) for k in _TRAIN_KEYS}, search=pipe.get("search"),
                     space=pipe.get("hparams_search") if pipe.get("search") else None)
    run_dir = files.join(out, f"train-{train_key}")
    steps["train"] = _step(run_dir, force, lambda: _train(config, data, run_dir, pipe))
    checkpoint = files.join(run_dir, "best")

    # 3. evaluate on the held-out split
    eval_dir = files.join(out, f"evaluate-{train_key}-{pipe['evaluate_split']}-tta{pipe.get('tta', 0)}")
    steps["evaluate"] = _step(eval_dir, force, lambda: _evaluate(config, data, checkpoint, eval_dir, pipe))

    # 4. reports
    for name in pipe.get("reports") or []:
        report_dir = files.join(out, f"report-{name}-{train_key}")
        steps[f"report:{name}"] = _step(report_dir, force,
                                        lambda n=name, d=report_dir: _report(config, n, d, run_dir))

    # 5. register the best checkpoint with its card and test metrics
    registry = files.absolute_url(config["registry"]["url"])
    registered = files.join(registry, pipe["name"], f"{version[:8]}-{train_key}")
    steps["register"] = _step(registered, force,
                              lambda: _register(checkpoint, eval_dir, registered, version, train_key))
    return {"version": version, "steps": steps, "registered": registered}


def _step(out: str, force: bool, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `action` unless `out` holds a finished step; record the result in out/DONE_FILE."""
    done = files.join(out, DONE_FILE)
    if not force and files.exists(done):
        return {"out": out, "skipped": True, "result": json.loads(files.read_text(done))}
    start = time.time()
    result = action() or {}
    result = {**result, "seconds": round(time.time() - start, 1)}
    files.write_text(done, json.dumps(result, indent=2, default=str))
    return {"out": out, "skipped": False, "result": result}


def _train(config: dict[str, Any], data: dict[str, Any], run_dir: str, pipe: dict[str, Any]) -> dict[str, Any]:
    if pipe.get("search"):
        from dermaid.config import compose
        from dermaid.tuning import tune

        tune_cfg = to_plain(compose("tune", [f"hparams_search={pipe['hparams_search']}"]))
        tune_cfg.update({k: v for k, v in config.items() if k in ("paths", "model", "optim", "augment", "train",
                                                                   "scaling", "run", "logger", "seed")})
        tune_cfg["data"] = data
        tune_cfg["out"] = run_dir
        result = tune(tune_cfg)
        return {"tuned": True, "best": result.get("best") if isinstance(result, dict) else None}
    from dermaid.training.train import train

    summary = train({**config, "data": data, "out": run_dir})
    return {"best_epoch": summary.get("best_epoch"), "best_metrics": summary.get("best_metrics")}


def _evaluate(config: dict[str, Any], data: dict[str, Any], checkpoint: str, out: str,
              pipe: dict[str, Any]) -> dict[str, Any]:
    from dermaid.evaluation.evaluate import evaluate

    result = evaluate({"paths": config["paths"], "data": data, "checkpoint": checkpoint,
                       "split": pipe["evaluate_split"], "tta": int(pipe.get("tta", 0)), "calibrated": True,
                       "device": "auto", "batch_size": 64, "out": out})
    return {"balanced_accuracy": result["metrics"].get("balanced_accuracy"), "num_images": result["num_images"]}


def _report(config: dict[str, Any], name: str, out: str, run_dir: str) -> dict[str, Any]:
    from dermaid.reporting.runner import build_report_from_config

    params = {"eda": {"data_root": config["data"]["root"]}, "train-report": {"run_dir": run_dir}}.get(name, {})
    report_cfg = _load_primary("report", config["paths"])
    report_cfg.update({"name": name, "params": params, "out": files.join(out, "report")})
    return {"report": build_report_from_config(report_cfg)}


def _register(checkpoint: str, eval_dir: str, target: str, version: str, train_key: str) -> dict[str, Any]:
    from dermaid.models.card import load_card

    card = load_card(checkpoint)  # a clear error when training left no usable checkpoint
    fs, src = files.get_fs(checkpoint)
    with files.atomic_dir(files.join(target, "model")) as tmp:
        for path in fs.ls(src, detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            files.write_bytes(files.join(tmp, name), fs.cat_file(path))
    metrics = files.join(eval_dir, "metrics.json")
    if files.exists(metrics):
        files.write_bytes(files.join(target, "metrics.json"), files.read_bytes(metrics))
    entry = {"dataset_version": version, "config_key": train_key, "model": card["model"].get("name"),
             "checkpoint": files.join(target, "model"), "source": checkpoint}
    files.write_text(files.join(target, "registry.json"), json.dumps(entry, indent=2))
    return entry


def _key(version: str, *parts: Any, **named: Any) -> str:
    """A short stable hash of a step's inputs (ignoring knobs that only change speed or tests)."""
    clean = json.loads(json.dumps([version, parts, named], sort_keys=True, default=str))
    for part in clean[1]:
        if isinstance(part, dict) and isinstance(part.get("train"), dict):
            for k in _IGNORED_TRAIN_KEYS:
                part["train"].pop(k, None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:12]


def _load_primary(name: str, paths: dict[str, Any]) -> dict[str, Any]:
    """conf/<name>.yaml resolved against this run's `paths` (no Hydra compose inside a Hydra app)."""
    raw = OmegaConf.load(conf_dir() / f"{name}.yaml")
    for key in ("defaults", "hydra"):
        raw.pop(key, None)
    return to_plain(OmegaConf.merge(raw, {"paths": paths}))
