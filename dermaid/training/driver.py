"""Training on Ray Train, the driver side: config -> checked inputs -> TorchTrainer -> fit -> summary.

    dermaid train experiment=toy
    dermaid train data.root=gs://bucket/isic2019 scaling=gpu4 model.name=efficientnet_b3
    dermaid train experiment=finetune train.init_from=runs/toy/best data.root=data/labels
    dermaid train experiment=toy out=runs/toy          # an existing out= is resumed from its last checkpoint

Every run writes to `out=DIR`: DIR/best/ and DIR/last/ (checkpoints with model cards),
DIR/history.csv (one row per epoch), DIR/config.yaml, DIR/summary.json, and Ray Train's own
checkpoints under DIR/ray/ (what a restarted worker group resumes from).

The driver checks every input (config keys, dataset version, fold, fine-tune source, loss hook,
an existing out=) before Ray starts, resolves the dataset version and turns the Hydra config into
the plain worker config (dermaid.training.worker_config); dermaid.training.worker runs in each Ray
Train worker. Decision support for research only; never a diagnosis.
"""

from __future__ import annotations

import json
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, is_local, join, read_text, write_text
from dermaid.processes import sigint_handler_kept
from dermaid.ray_runtime import ensure_ray
from dermaid.training.hooks import load_loss_hook
from dermaid.training.worker import SCORE_METRIC, train_fn_per_worker
from dermaid.training.worker_config import RunSettings, ScalingSettings, TrainConfig, WorkerConfig, parse_config

RAY_DIR_NAME = "ray"  # Ray Train's own checkpoints: DIR/ray/


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid train ...`: train, then print where the run is and its best validation metrics."""
    summary = train(cfg)
    print(f"\nrun directory: {summary['out']}")
    print(f"best epoch {summary['best_epoch']}: {SCORE_METRIC} {summary['best_metrics'].get(SCORE_METRIC, float('nan')):.4f}"
          f"  ({summary['wall_seconds']:.0f} s)")
    print(DISCLAIMER)
    return summary


def train(cfg: DictConfig | dict[str, Any], callbacks: list | None = None) -> dict[str, Any]:
    """Check the inputs, start or join Ray, fit the trainer, write DIR/summary.json; returns the summary.

    callbacks: Ray Train callbacks for the RunConfig (dermaid.tuning passes TuneReportCallback).
    """
    start = time.time()
    plain = to_plain(cfg)
    settings = TrainConfig.parse(plain)  # a wrong or missing key fails here, with its name
    worker_config = prepare_run(plain, settings)  # every input checked; Ray starts only if data needs preparing
    trainer = _create_trainer(settings, worker_config, callbacks)
    if settings.scaling.num_workers > 0:  # 0: Ray Train's local mode, the worker in this process, no cluster
        ensure_ray(settings.ray.address, settings.ray.num_cpus, log_to_driver=True)
        check_shared_storage({"out": worker_config["out"], "data.prepared_dir": worker_config["data"]["version_url"]},
                             settings.run.shared_storage)
    try:
        with sigint_handler_kept():  # Ray Train leaves its own Ctrl-C handler installed
            result = trainer.fit()
    except Exception as exc:
        cause = _user_error(exc)
        if cause is not None:
            raise DermaidError(f"training failed: {cause}") from None
        raise
    return _write_summary(worker_config, result, time.time() - start)


def build_trainer(cfg: DictConfig | dict[str, Any], callbacks: list | None = None):
    """The TorchTrainer for a composed `train` config (plain values only cross into the workers)."""
    plain = to_plain(cfg)
    settings = TrainConfig.parse(plain)
    return _create_trainer(settings, prepare_run(plain, settings), callbacks)


def _create_trainer(settings: TrainConfig, worker_config: dict[str, Any], callbacks: list | None):
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=worker_config,
        scaling_config=build_scaling_config(settings.scaling),
        run_config=build_run_config(settings.run, worker_config["out"], callbacks),
    )


def build_scaling_config(scaling: ScalingSettings | dict[str, Any]):
    """ScalingConfig from the `scaling` group: workers, GPUs, CPUs (and GPUs) per worker."""
    from ray.train import ScalingConfig

    if isinstance(scaling, dict):
        scaling = parse_config(ScalingSettings, scaling, "scaling")
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu and scaling.gpus_per_worker is not None:
        resources["GPU"] = scaling.gpus_per_worker  # without it, Ray's default for use_gpu: 1 GPU per worker
    return ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                         placement_strategy=scaling.placement_strategy)


def build_run_config(run: RunSettings, out: str, callbacks: list | None = None):
    """RunConfig from the `run` group: DIR/ray/, restarts, and the best checkpoints Ray keeps."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=RAY_DIR_NAME,
        storage_path=out,
        failure_config=FailureConfig(max_failures=run.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints, checkpoint_score_attribute=SCORE_METRIC,
                                           checkpoint_score_order="max"),
        callbacks=callbacks,
    )


def check_shared_storage(urls: dict[str, str], shared_storage: bool) -> None:
    """Ray Train's workers on every node write checkpoints to out= and read the prepared shards: on a cluster of
    several nodes a local path is on one node's disk only. Refused (naming the key) unless run.shared_storage=true
    says the path is a filesystem every node mounts; URLs (gs://, s3://) are shared by nature. Needs Ray started."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2 or shared_storage:
        return
    for key, url in urls.items():
        if is_local(url):
            raise DermaidError(
                f"{key}={url} is a path on this node's disk, but the Ray cluster has {len(nodes)} nodes: workers on "
                f"the others cannot reach it (Ray Train needs storage every node sees). Use a bucket URL "
                f"({key}=gs://bucket/...) or a shared filesystem mounted on every node, and then set "
                "run.shared_storage=true")


# ---------------------------------------------------------------------------------------------
# Run preparation: every input checked before any worker (or Ray) starts


def prepared_base(plain: dict[str, Any], out: str) -> tuple[dict[str, Any], str]:
    """The resolved config every run of a search or a CV starts from, and its dataset version's URL: a deep copy
    with out= set, local paths absolute (Ray workers run elsewhere), the dataset prepared (or resolved) once here
    and data.version pinned, so the runs only read it."""
    from dermaid.data.loading import read_manifest
    from dermaid.data.prepare import ensure_prepared

    base = json.loads(json.dumps(plain))  # a deep copy of plain values
    base["out"] = out
    data = base["data"]
    for key in ("root", "prepared_dir"):
        if data[key]:
            data[key] = absolute_url(data[key])
    if base["train"]["init_from"]:
        base["train"]["init_from"] = absolute_url(base["train"]["init_from"])
    version_url = ensure_prepared(data, base["ray"]["address"], base["ray"]["num_cpus"])
    data["version"] = read_manifest(version_url)["version"]
    return base, version_url


def prepare_run(plain: dict[str, Any], settings: TrainConfig) -> dict[str, Any]:
    """Resolve the dataset version, a fine-tune source and the loss hook, check them, write DIR/config.yaml.

    plain: the composed config as plain values; settings: the same, validated (TrainConfig.parse(plain)).
    Returns the worker config: plain values only (validated by WorkerConfig).
    """
    from dermaid.data.loading import read_manifest, split_filter
    from dermaid.data.prepare import check_raw_roots, ensure_prepared
    from dermaid.data.shards import preparation_block

    out = absolute_url(settings.out)
    model_cfg, train_cfg = settings.model.model_dump(), settings.train.model_dump()
    fold = int(settings.data["fold"])
    hook = _prepare_loss_hook(train_cfg["loss_hook"], plain)  # cheap checks (the teacher) before any data work
    _check_model(model_cfg, train_cfg)
    check_raw_roots(settings.data)
    version_url = absolute_url(ensure_prepared(settings.data, settings.ray.address, settings.ray.num_cpus))
    manifest = read_manifest(version_url)
    split_filter("val", fold, manifest["settings"]["folds"])  # a clear error for a fold out of range
    _check_split_sizes(manifest, fold, settings.scaling.num_workers, version_url)

    dataset_versions = [manifest["version"]]
    if train_cfg["init_from"]:
        train_cfg["init_from"] = absolute_url(train_cfg["init_from"])
        model_cfg, source_versions, input_size = _fine_tune_source(train_cfg["init_from"], model_cfg)
        dataset_versions = list(dict.fromkeys([*source_versions, manifest["version"]]))
        train_cfg["image_size"] = train_cfg["image_size"] or input_size

    _check_existing_run(out, model_cfg, manifest["version"])
    resolved = {**plain, "out": out, "model": model_cfg, "train": train_cfg,
                "dataset_version": manifest["version"]}
    if hook is not None:
        resolved[hook["section"]] = hook["settings"]
    write_text(join(out, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return WorkerConfig.parse({
        "out": out,
        "seed": settings.seed,
        "model": model_cfg,
        "train": train_cfg,
        "optim": plain["optim"],
        "augment": plain["augment"],
        "logger": plain["logger"],
        "use_gpu": settings.scaling.use_gpu,
        "cpus_per_worker": settings.scaling.cpus_per_worker,
        "log_level": settings.run.log_level,
        "data": {"version_url": version_url, "version": manifest["version"], "fold": fold,
                 "preparation": preparation_block(manifest["settings"])},
        "dataset_versions": dataset_versions,
        "loss_hook": {"path": train_cfg["loss_hook"], "settings": hook["settings"]} if hook else None,
        "config": resolved,
    }).model_dump()


def _prepare_loss_hook(path: str | None, plain: dict[str, Any]) -> dict[str, Any] | None:
    """train.loss_hook's driver-side check: {"section", "settings"}, or None for the plain loss."""
    if not path:
        return None
    hook = load_loss_hook(path)
    return {"section": hook.section, "settings": hook.prepare(plain)}


def _check_model(model_cfg: dict[str, Any], train_cfg: dict[str, Any]) -> None:
    """The backbone name (close names when timm lacks it) and a pretrained file (present, of this architecture:
    loaded once here), before any data work; a local pretrained file's path made absolute (workers run elsewhere)."""
    from dermaid.models.classifier import check_backbone_name, create_classifier

    if train_cfg["init_from"]:
        return  # the checkpoint's architecture is used (_fine_tune_source)
    check_backbone_name(model_cfg["name"])
    if model_cfg["pretrained_file"]:
        model_cfg["pretrained_file"] = absolute_url(model_cfg["pretrained_file"])
        create_classifier(model_cfg)  # PretrainedFileError (missing, unreadable, another architecture) names both


def _check_split_sizes(manifest: dict[str, Any], fold: int, workers: int, version_url: str) -> None:
    by_fold = {int(k): int(v) for k, v in manifest.get("counts", {}).get("fold", {}).items()}
    if not by_fold:
        return
    val = by_fold.get(fold, 0)
    train = sum(n for f, n in by_fold.items() if f not in (fold, -1))
    if val == 0:
        raise DermaidError(f"{version_url}: validation fold {fold} is empty; choose another data.fold")
    if train < 2 * workers:
        raise DermaidError(f"{version_url}: {train} training images for {workers} workers; "
                           "need at least two per worker (use a larger dataset or fewer scaling.num_workers)")


def _fine_tune_source(init_from: str, model_cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str], int]:
    """A fine-tune starts from a checkpoint: its architecture wins over the `model` group's."""
    from dermaid.models.card import load_float_model

    _, card = load_float_model(init_from)  # CheckpointError for a missing, unreadable or misfit checkpoint
    architecture = {k: card.model[k] for k in ("name", "use_metadata", "metadata_hidden") if k in card.model}
    if model_cfg["name"] != architecture.get("name"):
        print(f"fine-tune: model {architecture.get('name')!r} comes from {init_from} (model.name ignored)")
    merged = {**model_cfg, **architecture, "pretrained": False, "pretrained_file": None}
    return merged, card.trained_on, card.input_size[-1]


def _check_existing_run(out: str, model_cfg: dict[str, Any], version: str) -> None:
    """An out= that already holds a run is resumed; refuse when it trained something else."""
    url = join(out, "config.yaml")
    if not exists(url):
        return
    previous = OmegaConf.to_container(OmegaConf.create(read_text(url)), resolve=False)
    before_model = previous.get("model", {})  # an older run's config.yaml: read leniently
    before_version = previous.get("dataset_version")
    if before_model.get("name") != model_cfg["name"] or bool(before_model.get("use_metadata")) != bool(
            model_cfg["use_metadata"]):
        raise DermaidError(
            f"out={out} holds a run of model {before_model.get('name')!r} "
            f"(use_metadata={before_model.get('use_metadata')}); choose another out= for "
            f"{model_cfg['name']!r} (use_metadata={model_cfg['use_metadata']})")
    if before_version and before_version != version:
        raise DermaidError(f"out={out} holds a run on dataset version {before_version}, not {version}; "
                           "choose another out=")


# ---------------------------------------------------------------------------------------------
# After the fit


def _write_summary(config: dict[str, Any], result, wall_seconds: float) -> dict[str, Any]:
    """DIR/summary.json from the best/ and last/ cards (what the user sees) and Ray's latest checkpoint."""
    from dermaid.evaluation.metrics import json_safe
    from dermaid.models.card import load_card

    out = config["out"]
    best_url, last_url = join(out, "best"), join(out, "last")
    best_card = load_card(best_url) if exists(join(best_url, "card.json")) else None
    last_card = load_card(last_url) if exists(join(last_url, "card.json")) else None
    metrics = {k: v for k, v in (best_card.metrics if best_card else {}).items() if not isinstance(v, dict)}
    summary = {
        "out": out,
        "best_checkpoint": best_url,
        "last_checkpoint": last_url,
        "best_epoch": best_card.epoch if best_card else None,
        "last_epoch": last_card.epoch if last_card else None,
        "best_metrics": metrics,
        "temperature": best_card.calibration.get("temperature") if best_card else None,
        "dataset_version": config["data"]["version"],
        "dataset_versions": config["dataset_versions"],
        "model": config["model"],
        "wall_seconds": round(wall_seconds, 1),
        "ray_checkpoint": getattr(getattr(result, "checkpoint", None), "path", None),
    }
    write_text(join(out, "summary.json"), json.dumps(json_safe(summary), indent=2, default=str))
    return summary


def _user_error(exc: BaseException) -> str | None:
    """The message of a DermaidError raised inside a worker, if that is what failed the run."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DermaidError):
            return str(err)
        failures = getattr(err, "worker_failures", None) or {}
        stack += [e for e in failures.values() if isinstance(e, BaseException)]
        stack += [e for e in (err.__cause__, err.__context__) if e is not None]
    return None
