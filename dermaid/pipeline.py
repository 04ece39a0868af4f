"""The end-to-end pipeline: prepare -> train (or tune) -> evaluate -> reports -> register.

    dermaid pipeline experiment=toy
    dermaid pipeline data.root=gs://bucket/isic2019 scaling=gpu4 model.name=efficientnet_b3 \
        registry.url=gs://bucket/registry
    ray job submit --address http://HEAD:8265 --working-dir . -- dermaid pipeline experiment=toy

Each step is one function of the plain `pipeline` config (`prepare_data`, `train_model`, `evaluate_model`,
`write_report`, `register_model`); `make demo` (dermaid/demo.py) calls the same functions with its own
output folders. Here each step's output lives under `pipeline.out/<step>-<key>/`, where the key hashes
the step's inputs (the dataset version and the config that matters to that step). A step whose output
exists is skipped, so re-running an unchanged pipeline only re-prints where everything is. Inside a Ray
Job the driver joins the job's cluster ($RAY_ADDRESS); locally it starts a private Ray.

With `pipeline.search=true` the model comes from `dermaid tune`: its best checkpoint is evaluated and
registered, and the training report reads the best trial's run directory (the tuning directory itself
is what `tune-report` reads).
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
from dermaid.config import compose, to_plain
from dermaid.errors import DermaidError

DONE_FILE = "pipeline_step.json"  # written last into a step folder: its presence means the step finished

# train-config keys whose values change the trained model (not where it is written or how it is logged)
_TRAIN_KEYS = ("model", "optim", "augment", "train", "seed")
_IGNORED_TRAIN_KEYS = ("fail_at_epoch", "loader_workers", "torch_threads")
# train keys added after pipelines had run, with the value that means "as before" (not hashed at that value)
_KEYS_ADDED_LATER = {"loss_hook": None}
# keys of the tune config taken from the pipeline's own (train) config
_TUNE_KEYS = ("paths", "model", "optim", "augment", "train", "scaling", "run", "ray", "logger", "seed")


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid pipeline ...`: run every step, print a summary of where the outputs are."""
    summary = run_pipeline(to_plain(cfg))
    print("\npipeline finished:")
    for step, info in summary["steps"].items():
        print(f"  {step:<10} {'skipped (exists)' if info['skipped'] else 'ran':<17} {info['out']}")
    print(f"registered: {summary['registered']}")
    record = summary["steps"]["register"]["result"]
    if record.get("version"):  # the registry's version; nothing is served until someone promotes it
        print(f"promote it with: dermaid registry promote {record['name']}@{record['version']}"
              + ("" if record.get("promotable", True) else "  (its card fails the checks: `dermaid registry show`)"))
    print(DISCLAIMER)
    return summary


def run_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """A plain `pipeline` config -> {steps: {name: {out, skipped, result}}, registered, version}."""
    pipe = config["pipeline"]
    out = files.absolute_url(pipe["out"])
    force = bool(pipe["force"])
    steps: dict[str, dict[str, Any]] = {}

    # 1. prepare: content-addressed already (the version is the hash), so ensure_prepared is the skip
    start = time.time()
    version_url = prepare_data(config)
    version = version_url.rstrip("/").rsplit("/", 1)[-1]
    steps["prepare"] = {"out": version_url, "skipped": False, "seconds": round(time.time() - start, 1)}
    config = with_version(config, version_url)

    # 2. train (or tune)
    train_key = _key(version, {k: config[k] for k in _TRAIN_KEYS}, search=pipe["search"],
                     space=pipe["hparams_search"] if pipe["search"] else None)
    train_dir = files.join(out, f"train-{train_key}")
    steps["train"] = _step(train_dir, force, lambda: train_model(config, train_dir))
    trained = _trained(steps["train"]["result"], train_dir)

    # 2b. calibrate: OOD statistics, abstention threshold and triage cut-off into the best checkpoint
    steps["calibrate"] = _step(files.join(out, f"calibrate-{train_key}"), force,
                               lambda: calibrate_model(config, trained["checkpoint"]))

    # 3. evaluate on the held-out split
    eval_dir = files.join(out, f"evaluate-{train_key}-{pipe['evaluate_split']}-tta{pipe['tta']}")
    steps["evaluate"] = _step(eval_dir, force, lambda: _evaluation_record(
        evaluate_model(config, trained["checkpoint"], eval_dir)))

    # 4. reports
    for name in pipe["reports"] or []:
        report_dir = files.join(out, f"report-{name}-{train_key}")
        steps[f"report:{name}"] = _step(report_dir, force, lambda n=name, d=report_dir: {
            "report": write_report(config, n, trained, out=files.join(d, "report"))})

    # 5. register the best checkpoint with its card and test metrics
    # (dermaid.registry: an immutable version <registry.url>/<name>/versions/<version>/; promotion is a separate,
    # deliberate step: `dermaid registry promote NAME@VERSION`)
    registry = files.absolute_url(config["registry"]["url"])
    model_version = f"{version[:8]}-{train_key}"
    steps["register"] = _step(files.join(out, f"register-{train_key}"), force, lambda: register_model(
        trained["checkpoint"], eval_dir, registry, pipe["name"], model_version, version, train_key))
    registered = steps["register"]["result"].get("checkpoint", files.join(registry, pipe["name"]))
    return {"version": version, "steps": steps, "registered": registered}


# --------------------------------------------------------------------------- the steps

def prepare_data(config: dict[str, Any]) -> str:
    """Join or start Ray (`ray.*`), prepare `data` (cached by content); returns the dataset version URL."""
    from dermaid.data.prepare import check_raw_roots, ensure_prepared
    from dermaid.ray_runtime import ensure_ray_for

    check_raw_roots(config["data"])  # before Ray starts: a wrong data.root is said at once
    ensure_ray_for(config, log_to_driver=True)
    return ensure_prepared(config["data"], config["ray"]["address"], config["ray"]["num_cpus"])


def with_version(config: dict[str, Any], version_url: str) -> dict[str, Any]:
    """The config with `data` pinned to a prepared version (later steps read it, never prepare again)."""
    prepared_dir, version = version_url.rstrip("/").rsplit("/", 1)
    return {**config, "data": {**config["data"], "prepared_dir": prepared_dir, "version": version}}


def train_model(config: dict[str, Any], out: str) -> dict[str, Any]:
    """Train into `out` (a `dermaid train` run directory), or with `pipeline.search` tune into it.

    Returns the training summary (or the tuning summary) with `run_dir`, the run directory of the model
    (for a search: the best trial's), `checkpoint` (its best checkpoint) and `tune_dir` (a search only)."""
    if config["pipeline"]["search"]:
        return _tune_model(config, out)
    from dermaid.training.driver import train

    summary = train({**config, "out": out})
    return {**summary, "run_dir": out, "checkpoint": files.join(out, "best")}


def _tune_model(config: dict[str, Any], out: str) -> dict[str, Any]:
    from dermaid.tuning import tune

    tune_cfg = to_plain(compose("tune", [f"hparams_search={config['pipeline']['hparams_search']}"]))
    tune_cfg.update({k: v for k, v in config.items() if k in _TUNE_KEYS})
    tune_cfg.update({"data": config["data"], "out": out})
    summary = tune(tune_cfg)
    best = summary["best"]  # None when an interrupted search has no finished trial with a checkpoint
    if best is None:
        raise DermaidError(f"pipeline: the search in {out} ended without a finished trial to evaluate; "
                           "run the pipeline again to resume it")
    return {**summary, "run_dir": best["trial_dir"], "checkpoint": files.join(out, "best"), "tune_dir": out}


def calibrate_model(config: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """`dermaid calibrate` of `checkpoint` on the config's data: the OOD detectors fitted on its training fold, the
    abstention threshold and the triage cut-off chosen on its validation fold, written into the checkpoint."""
    from dermaid.evaluation.calibrate import calibrate

    result = calibrate(_command_config("calibrate", config, checkpoint=checkpoint))
    return {"ood": {k: result["ood"][k] for k in ("method", "threshold", "refuse_share")},
            "triage": {k: result["triage"][k] for k in ("cutoff", "sensitivity", "specificity")}}


def evaluate_model(config: dict[str, Any], checkpoint: str, out: str) -> dict[str, Any]:
    """`dermaid evaluate` of `checkpoint` on `pipeline.evaluate_split` of the config's data, into `out`."""
    from dermaid.evaluation.evaluate import evaluate

    pipe = config["pipeline"]
    return evaluate(_command_config("evaluate", config, checkpoint=checkpoint, split=pipe["evaluate_split"],
                                    tta=pipe["tta"], out=out))


def write_report(config: dict[str, Any], name: str, trained: dict[str, Any], out: str | None = None) -> str:
    """`dermaid report NAME` on the config's data and the trained model (run_dir, checkpoint, tune_dir: whichever
    parameters the report takes); `out` None: a new folder under paths.reports_dir. Returns the report folder."""
    from dermaid.reporting.runner import build_report_from_config

    report_cfg = _command_config("report", config, [f"report={name}"], out=out)
    wanted = report_cfg["report"]["params"]
    report_cfg["params"] = {key: trained[key] for key in ("run_dir", "checkpoint", "tune_dir")
                            if key in wanted and trained.get(key)}
    return build_report_from_config(report_cfg)


def register_model(checkpoint: str, eval_dir: str, registry_root: str, name: str, model_version: str,
                   dataset_version: str, train_key: str) -> dict[str, Any]:
    """Register the checkpoint (with its card) as `name@model_version` in the registry at `registry_root`, with the
    evaluation's metrics.json as its test metrics. Registering the same checkpoint again (a re-run whose step record
    was removed) returns the existing version; a different checkpoint under that version is refused."""
    from dermaid.models.card import load_card
    from dermaid.models.card import model_version as card_id
    from dermaid.registry import Registry, RegistryError

    card = load_card(checkpoint)  # a clear error when training left no usable checkpoint
    metrics_url = files.join(eval_dir, "metrics.json")
    metrics_bytes = files.read_bytes(metrics_url) if files.exists(metrics_url) else None
    metrics = json.loads(metrics_bytes) if metrics_bytes else None
    registry = Registry(registry_root)
    provenance = {"dataset_version": dataset_version, "config_key": train_key}
    try:
        record = registry.register(checkpoint, name, model_version, metrics=metrics, provenance=provenance,
                                   extra_files={"metrics.json": metrics_bytes} if metrics_bytes else None)
    except RegistryError:
        record = registry.version(name, model_version) if model_version in {
            v.version for v in registry.versions(name)} else None
        if record is None or record.card_id != card_id(card):
            raise
    return {"name": name, "version": record.version, "checkpoint": record.checkpoint, "model": record.model,
            "dataset_version": dataset_version, "config_key": train_key, "source": checkpoint,
            "promotable": not record.problems}


# --------------------------------------------------------------------------- helpers

def _command_config(name: str, config: dict[str, Any], overrides: list[str] = (), **values: Any) -> dict[str, Any]:
    """conf/<name>.yaml composed, with this pipeline's `paths` and `data` and the given values set."""
    cfg = compose(name, list(overrides))
    OmegaConf.update(cfg, "paths", config["paths"], merge=True)
    OmegaConf.update(cfg, "data", config["data"], merge=True)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return to_plain(cfg)


def _trained(record: dict[str, Any], train_dir: str) -> dict[str, Any]:
    """What later steps need from a train step's record; a record written before `run_dir` was recorded
    (an older pipeline version) means a plain training run in train_dir."""
    return {"run_dir": record.get("run_dir", train_dir),
            "checkpoint": record.get("checkpoint", files.join(train_dir, "best")),
            "tune_dir": record.get("tune_dir")}


def _evaluation_record(result: dict[str, Any]) -> dict[str, Any]:
    return {"balanced_accuracy": result["metrics"]["balanced_accuracy"], "num_images": result["num_images"]}


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


def _key(version: str, *parts: Any, **named: Any) -> str:
    """A short stable hash of a step's inputs (ignoring knobs that only change speed or tests)."""
    clean = json.loads(json.dumps([version, parts, named], sort_keys=True, default=str))
    for part in clean[1]:
        if isinstance(part, dict) and isinstance(part.get("train"), dict):
            for k in _IGNORED_TRAIN_KEYS:
                part["train"].pop(k, None)
            for k, unset in _KEYS_ADDED_LATER.items():  # at their default, keys of finished steps stay the same
                if part["train"].get(k, unset) == unset:
                    part["train"].pop(k, None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:12]
