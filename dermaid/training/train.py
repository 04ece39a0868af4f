"""Training on Ray Train: one TorchTrainer, the same code on a laptop and on a GPU cluster.

    dermaid train experiment=toy
    dermaid train data.root=gs://bucket/isic2019 scaling=gpu4 model.name=efficientnet_b3
    dermaid train experiment=finetune train.init_from=runs/toy/best data.root=data/labels
    dermaid train experiment=toy out=runs/toy          # an existing out= is resumed from its last checkpoint

Every run writes to `out=DIR`: DIR/best/ and DIR/last/ (checkpoints with model cards),
DIR/history.csv (one row per epoch), DIR/config.yaml, DIR/summary.json, and Ray Train's own
checkpoints under DIR/ray/ (what a restarted worker group resumes from).

Shape (Ray Train V2): the driver resolves the dataset version and turns the Hydra config into a
plain dict; `train_fn_per_worker(config)` runs in each worker: it reads its own shard of the
prepared version, builds the model, calls loop.py once per epoch, gathers the validation
predictions, and reports metrics + a checkpoint with `ray.train.report`. Only rank 0 logs,
writes cards and saves. Decision support for research only; never a diagnosis.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER, NUM_CLASSES
from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, is_local, join, read_text, write_text
from dermaid.processes import sigint_handler_kept
from dermaid.ray_compat import quiet_train_report_log
from dermaid.training.history import format_epoch_line, write_history

SCORE_METRIC = "val/balanced_accuracy"  # early stopping, best checkpoint and CheckpointConfig score
TRAIN_STATE_FILE = "train_state.pt"
FAIL_MARKER = ".fail_injected"
RAY_DIR_NAME = "ray"


# ---------------------------------------------------------------------------------------------
# Driver side: config -> TorchTrainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid train ...`: train, then print where the run is and its best validation metrics."""
    summary = train(cfg)
    print(f"\nrun directory: {summary['out']}")
    print(f"best epoch {summary['best_epoch']}: {SCORE_METRIC} {summary['best_metrics'].get(SCORE_METRIC, float('nan')):.4f}"
          f"  ({summary['wall_seconds']:.0f} s)")
    print(DISCLAIMER)
    return summary


def train(cfg: DictConfig | dict[str, Any], callbacks: list | None = None) -> dict[str, Any]:
    """Build the trainer, fit it, write DIR/summary.json; returns the summary.

    callbacks: Ray Train callbacks for the RunConfig (dermaid.tuning passes TuneReportCallback).
    """
    start = time.time()
    _ensure_ray(to_plain(cfg).get("run", {}))
    trainer = build_trainer(cfg, callbacks=callbacks)
    config = trainer.train_loop_config
    try:
        with sigint_handler_kept():  # Ray Train leaves its own Ctrl-C handler installed
            result = trainer.fit()
    except Exception as exc:
        cause = _user_error(exc)
        if cause is not None:
            raise DermaidError(f"training failed: {cause}") from None
        raise
    return _write_summary(config, result, time.time() - start)


def build_trainer(cfg: DictConfig | dict[str, Any], callbacks: list | None = None):
    """The TorchTrainer for a composed `train` config (plain values only cross into the workers)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    plain = to_plain(cfg)
    worker_config = _prepare_run(plain)
    run_cfg = plain["run"]
    run_config = RunConfig(
        name=RAY_DIR_NAME,
        storage_path=worker_config["out"],
        failure_config=FailureConfig(max_failures=int(run_cfg["max_failures"])),
        checkpoint_config=CheckpointConfig(
            num_to_keep=int(run_cfg["keep_checkpoints"]),
            checkpoint_score_attribute=SCORE_METRIC,
            checkpoint_score_order="max",
        ),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=worker_config,
        scaling_config=build_scaling_config(plain["scaling"]),
        run_config=run_config,
    )


def build_scaling_config(scaling: dict[str, Any]):
    """ScalingConfig from the `scaling` group: workers, GPUs, CPUs (and GPUs) per worker."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": float(scaling.get("cpus_per_worker", 1))}
    use_gpu = bool(scaling.get("use_gpu", False))
    if use_gpu:
        resources["GPU"] = float(scaling.get("gpus_per_worker", 1))
    return ScalingConfig(
        num_workers=int(scaling["num_workers"]),
        use_gpu=use_gpu,
        resources_per_worker=resources,
        placement_strategy=str(scaling.get("placement_strategy", "PACK")),
    )


def _ensure_ray(run_cfg: dict[str, Any]) -> None:
    """Join $RAY_ADDRESS / run.ray_address, or start a private local Ray (dermaid.ray_runtime)."""
    from dermaid.ray_runtime import ensure_ray

    ensure_ray(run_cfg.get("ray_address"), run_cfg.get("num_cpus"), log_to_driver=True)


def _prepare_run(plain: dict[str, Any]) -> dict[str, Any]:
    """Resolve the dataset version and a fine-tune source, check them, write DIR/config.yaml.

    Returns the worker config: plain values only.
    """
    from dermaid.data.loading import read_manifest, split_filter
    from dermaid.data.prepare import ensure_prepared

    out = absolute_url(plain["out"])
    train_cfg = dict(plain["train"])
    model_cfg = dict(plain["model"])
    data_cfg = dict(plain["data"])
    fold = int(data_cfg.get("fold", 0))

    version_url = absolute_url(ensure_prepared(data_cfg))
    manifest = read_manifest(version_url)
    split_filter("val", fold, manifest["settings"]["folds"])  # a clear error for a fold out of range
    _check_split_sizes(manifest, fold, int(plain["scaling"]["num_workers"]), version_url)

    dataset_versions = [manifest["version"]]
    init_from = train_cfg.get("init_from")
    if init_from:
        init_from = absolute_url(init_from)
        model_cfg, source_versions, input_size = _fine_tune_source(init_from, model_cfg)
        dataset_versions = list(dict.fromkeys([*source_versions, manifest["version"]]))
        train_cfg["image_size"] = train_cfg.get("image_size") or input_size
    train_cfg["init_from"] = init_from

    from dermaid.compress.distill import check_distill

    distill = check_distill(plain.get("distill"), absolute_url)  # None unless `dermaid distill`

    _check_existing_run(out, model_cfg, manifest["version"])
    resolved = {**plain, "out": out, "model": model_cfg, "train": train_cfg, "dataset_version": manifest["version"]}
    if distill:
        resolved["distill"] = distill
    write_text(join(out, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return {
        "out": out,
        "seed": int(plain.get("seed", 0)),
        "model": model_cfg,
        "train": train_cfg,
        "optim": dict(plain["optim"]),
        "augment": dict(plain["augment"]),
        "logger": dict(plain.get("logger") or {"name": "none"}),
        "use_gpu": bool(plain["scaling"].get("use_gpu", False)),
        "cpus_per_worker": float(plain["scaling"].get("cpus_per_worker", 1)),
        "log_level": str(plain["run"].get("log_level", "WARNING")),
        "data": {"version_url": version_url, "version": manifest["version"], "fold": fold},
        "dataset_versions": dataset_versions,
        "distill": distill,
        "config": resolved,
    }


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
    architecture = {k: card["model"][k] for k in ("name", "use_metadata", "metadata_hidden") if k in card["model"]}
    if model_cfg.get("name") != architecture.get("name"):
        print(f"fine-tune: model {architecture.get('name')!r} comes from {init_from} (model.name ignored)")
    merged = {**model_cfg, **architecture, "pretrained": False}
    versions = list(card.get("dataset_versions") or ([card["dataset_version"]] if card.get("dataset_version") else []))
    return merged, versions, int(card["input"]["input_size"][-1])


def _check_existing_run(out: str, model_cfg: dict[str, Any], version: str) -> None:
    """An out= that already holds a run is resumed; refuse when it trained something else."""
    url = join(out, "config.yaml")
    if not exists(url):
        return
    previous = OmegaConf.to_container(OmegaConf.create(read_text(url)), resolve=False)
    before_model = previous.get("model", {})
    before_version = previous.get("dataset_version")
    if before_model.get("name") != model_cfg.get("name") or bool(before_model.get("use_metadata")) != bool(
            model_cfg.get("use_metadata")):
        raise DermaidError(
            f"out={out} holds a run of model {before_model.get('name')!r} "
            f"(use_metadata={before_model.get('use_metadata')}); choose another out= for "
            f"{model_cfg.get('name')!r} (use_metadata={model_cfg.get('use_metadata')})")
    if before_version and before_version != version:
        raise DermaidError(f"out={out} holds a run on dataset version {before_version}, not {version}; "
                           "choose another out=")


def _write_summary(config: dict[str, Any], result, wall_seconds: float) -> dict[str, Any]:
    from dermaid.models.card import load_card

    out = config["out"]
    best_url, last_url = join(out, "best"), join(out, "last")
    best_card = load_card(best_url) if exists(join(best_url, "card.json")) else {}
    last_card = load_card(last_url) if exists(join(last_url, "card.json")) else {}
    metrics = {k: v for k, v in (best_card.get("metrics") or {}).items() if not isinstance(v, dict)}
    summary = {
        "out": out,
        "best_checkpoint": best_url,
        "last_checkpoint": last_url,
        "best_epoch": best_card.get("epoch"),
        "last_epoch": last_card.get("epoch"),
        "best_metrics": metrics,
        "temperature": (best_card.get("calibration") or {}).get("temperature"),
        "dataset_version": config["data"]["version"],
        "dataset_versions": config["dataset_versions"],
        "model": config["model"],
        "wall_seconds": round(wall_seconds, 1),
        "ray_checkpoint": getattr(getattr(result, "checkpoint", None), "path", None),
    }
    from dermaid.evaluation.metrics import json_safe

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


# ---------------------------------------------------------------------------------------------
# Worker side


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its data shard, the model (DDP), one loop.py epoch at a time, reports."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from dermaid.data.torch_dataset import (
        LesionDataset, create_eval_loader, create_train_loader, pad_records, read_worker_records,
    )
    from dermaid.data.transforms import create_train_transform
    from dermaid.models.card import load_state_dict
    from dermaid.models.classifier import create_classifier, resolve_input_spec
    from dermaid.training import loop

    # -- unpack the config ---------------------------------------------------------------------
    out = config["out"]
    seed = int(config["seed"])
    model_cfg, train_cfg, optim_cfg = config["model"], config["train"], config["optim"]
    augment_cfg, logger_cfg, data = config["augment"], config["logger"], config["data"]
    epochs = int(train_cfg["epochs"])
    batch_size = int(train_cfg["batch_size"])
    patience = int(train_cfg.get("early_stopping_patience") or 0)
    imbalance = str(train_cfg.get("imbalance", "weighted_loss"))
    if imbalance not in ("weighted_loss", "balanced_sampler", "none"):
        raise DermaidError(f"train.imbalance={imbalance!r}: expected weighted_loss, balanced_sampler or none")

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    quiet_train_report_log(config.get("log_level", "WARNING"))
    # intra-op threads: the config's, else the worker's whole CPUs (never more threads than cores reserved)
    torch.set_num_threads(int(train_cfg.get("torch_threads") or max(1, int(config.get("cpus_per_worker", 1)))))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    amp_dtype = loop.resolve_amp_dtype(train_cfg.get("amp", "auto"), device)
    channels_last = loop.resolve_channels_last(train_cfg.get("channels_last", "auto"), device)

    # -- model (identical init on every rank; DDP also broadcasts rank 0's weights) ------------
    loop.set_seed(seed)
    model = create_classifier(model_cfg)
    input_spec = resolve_input_spec(model, train_cfg.get("image_size"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and train_cfg.get("init_from"):
        model.load_state_dict(load_state_dict(train_cfg["init_from"]))
    loop.set_seed(seed + 1000 * rank)  # per-worker augmentation and dropout streams

    # -- this worker's shard of the prepared version -------------------------------------------
    train_records, train_info = read_worker_records(data["version_url"], "train", data["fold"], rank, world)
    train_records = pad_records(train_records, train_info["per_rank"])
    val_records, _ = read_worker_records(data["version_url"], "val", data["fold"], rank, world)
    size = int(input_spec["input_size"][-1])
    train_set = LesionDataset(train_records, create_train_transform(input_spec, augment_cfg),
                              draft_size=math.ceil(size / float(input_spec.get("crop_pct", 1.0))))
    sampling = "balanced" if imbalance == "balanced_sampler" else "shuffle"
    loader_workers = int(train_cfg.get("loader_workers", 0))
    pin = device.type == "cuda"
    train_loader = create_train_loader(train_set, batch_size, sampling, train_info["class_counts"], seed + rank,
                                       num_workers=loader_workers, pin_memory=pin)
    val_loader = create_eval_loader(val_records, input_spec, batch_size=batch_size * 2,
                                    num_workers=loader_workers, pin_memory=pin)

    # -- DDP model, optimiser, schedule, loss --------------------------------------------------
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    plain_model = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    optimizer = loop.create_optimizer(ddp_model, float(optim_cfg["lr"]), float(optim_cfg["weight_decay"]),
                                      tuple(optim_cfg.get("betas", (0.9, 0.999))),
                                      float(optim_cfg.get("backbone_lr_scale", 1.0)))
    steps_per_epoch = len(train_loader)
    scheduler = loop.create_cosine_schedule(optimizer, epochs * steps_per_epoch,
                                            float(optim_cfg.get("warmup_epochs", 0)) * steps_per_epoch,
                                            float(optim_cfg.get("min_lr_ratio", 0.01)))
    weights = None
    if imbalance == "weighted_loss":
        weights = loop.compute_class_weights(train_info["class_counts"],
                                             float(train_cfg.get("class_weight_power", 1.0))).to(device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=float(train_cfg.get("label_smoothing", 0.0)))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    teacher = None
    if config.get("distill"):  # `dermaid distill`: KD loss against a frozen teacher (dermaid.compress.distill)
        from dermaid.compress.distill import DistillationLoss, create_teacher

        teacher = create_teacher(config["distill"]["teacher"], input_spec, device)
        loss_fn = DistillationLoss(loss_fn, config["distill"]["alpha"], config["distill"]["temperature"])

    # -- resume ----------------------------------------------------------------------------------
    state: dict[str, Any] = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0,
                             "history": [], "attempt": 1}
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            plain_model.load_state_dict(load_state_dict(ckpt_dir))
            saved = torch.load(os.path.join(ckpt_dir, TRAIN_STATE_FILE), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = {**saved["state"], "attempt": saved["state"]["attempt"] + 1}
        if rank == 0:
            _console(f"resumed from the checkpoint of epoch {state['epoch']} (attempt {state['attempt']})")

    run = _start_wandb(logger_cfg, config, out) if rank == 0 else None

    # -- epochs (none left when a resumed run had already finished or stopped early) -------------
    first_epoch = epochs + 1 if patience and state["bad_epochs"] >= patience else state["epoch"] + 1
    for epoch in range(first_epoch, epochs + 1):
        _maybe_inject_failure(train_cfg, epoch, rank, world, out)
        started = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        stats = loop.train_one_epoch(
            ddp_model, train_loader, optimizer, scheduler, loss_fn, device, amp_dtype, channels_last, scaler,
            metadata_dropout=float(model_cfg.get("metadata_dropout", 0.0)) if model_cfg.get("use_metadata") else 0.0,
            grad_clip=train_cfg.get("grad_clip"), max_steps=train_cfg.get("max_steps_per_epoch"), teacher=teacher,
        )
        train_loss = _mean_over_workers(stats["loss"] * stats["samples"], stats["samples"], device, dist)
        _broadcast_buffers(plain_model, dist)  # BatchNorm statistics of rank 0: the model that is saved
        logits, labels = loop.predict_logits(plain_model, val_loader, device, amp_dtype, channels_last)
        logits, labels = _gather(logits[:, 0], labels, dist)  # (N_val, K), (N_val,) in shard order
        row, details, temperature = _epoch_metrics(logits, labels)
        row = {"epoch": epoch, "attempt": state["attempt"], "train/loss": train_loss, **row,
               "lr": max(g["lr"] for g in optimizer.param_groups), "seconds": time.perf_counter() - started,
               "train/images_per_s": stats["images_per_s"] * world}
        score = row[SCORE_METRIC]
        improved = not math.isnan(score) and score > state["best_score"] + float(train_cfg.get("min_delta", 0.0))
        state["history"].append(row)
        state.update(epoch=epoch)
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        stop = bool(patience) and state["bad_epochs"] >= patience

        if rank == 0:
            card = _epoch_card(config, input_spec, row, details, temperature, epoch)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_dir = _write_ray_checkpoint(tmp, card, plain_model, optimizer, scheduler, scaler, state)
                _save_run_checkpoints(out, card, plain_model, improved)
                write_history(out, state["history"])
                _console(format_epoch_line(row, epochs, improved))
                if run is not None:
                    run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
        else:
            ray.train.report(row, checkpoint=None)
        if stop and epoch < epochs:
            if rank == 0:
                _console(f"early stopping: no {SCORE_METRIC} gain for {patience} epochs "
                         f"(best {state['best_score']:.4f} at epoch {state['best_epoch']})")
            break
    if run is not None:
        run.finish()


def _console(line: str) -> None:
    """One progress line on the driver's console: the worker's raw stdout (Ray Train's print patch
    would log it twice: to its logger and, through Ray's wrapped stdout, to the console)."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _epoch_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], dict, float]:
    """Validation logits -> (flat val/* metrics, the full metric table, the fitted temperature)."""
    from dermaid.evaluation.calibration import calibration_report
    from dermaid.evaluation.metrics import compute_metrics, flatten_metrics

    z, y = logits.numpy().astype(np.float64), labels.numpy()
    calibration = calibration_report(z, y)
    probs = torch.softmax(torch.as_tensor(z), dim=-1).numpy()
    details = compute_metrics(y, probs)
    row = {"val/loss": calibration["nll"], **flatten_metrics(details, "val"),
           **{f"val/{k}": v for k, v in calibration.items()}}
    return row, details, calibration["temperature"]


def _epoch_card(config: dict[str, Any], input_spec: dict[str, Any], row: dict[str, Any], details: dict,
                temperature: float, epoch: int) -> dict[str, Any]:
    from dermaid.evaluation.metrics import json_safe
    from dermaid.models.card import build_card

    return build_card(
        config["model"], input_spec,
        dataset_version=config["data"]["version"],
        dataset_versions=config["dataset_versions"],
        config=config["config"],
        metrics=json_safe({**row, "val": details}),
        temperature=temperature,
        epoch=epoch,
        teacher=(config.get("distill") or {}).get("teacher"),
    )


def _write_ray_checkpoint(tmp: str, card: dict[str, Any], model, optimizer, scheduler, scaler,
                          state: dict[str, Any]) -> str:
    """A Ray checkpoint that is also a DermAID checkpoint (card.json + model.pt) plus the train state."""
    from dermaid.models.card import save_checkpoint

    ckpt_dir = os.path.join(tmp, "checkpoint")
    save_checkpoint(ckpt_dir, card, model.state_dict())
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": state,
    }, os.path.join(ckpt_dir, TRAIN_STATE_FILE))
    return ckpt_dir


def _save_run_checkpoints(out: str, card: dict[str, Any], model, improved: bool) -> None:
    """DIR/last every epoch, DIR/best when the score improved (each written atomically)."""
    from dermaid.models.card import save_checkpoint

    state_dict = model.state_dict()
    save_checkpoint(join(out, "last"), card, state_dict)
    if improved:
        save_checkpoint(join(out, "best"), card, state_dict)


def _mean_over_workers(total: float, count: int, device, dist) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return total / max(1, count)
    buf = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return float(buf[0] / buf[1].clamp(min=1))


def _broadcast_buffers(model, dist) -> None:
    """Give every worker rank 0's buffers (DDP syncs them before each forward, so the last local
    step leaves them slightly apart): all workers then validate exactly the checkpointed model."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _gather(logits: torch.Tensor, labels: torch.Tensor, dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's validation predictions, concatenated in rank order (same on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return logits, labels
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (logits.numpy(), labels.numpy()))
    return (torch.as_tensor(np.concatenate([p[0] for p in parts if len(p[0])]).reshape(-1, NUM_CLASSES)),
            torch.as_tensor(np.concatenate([p[1] for p in parts])))


def _maybe_inject_failure(train_cfg: dict[str, Any], epoch: int, rank: int, world: int, out: str) -> None:
    """Tests only (train.fail_at_epoch): the last worker raises once at the start of that epoch."""
    fail_at = train_cfg.get("fail_at_epoch")
    if not fail_at or epoch != int(fail_at) or rank != world - 1:
        return
    marker = join(out, FAIL_MARKER)
    if exists(marker):
        return
    write_text(marker, f"failure injected at epoch {epoch}\n")
    raise RuntimeError(f"injected worker failure at epoch {epoch} (train.fail_at_epoch)")


def _start_wandb(logger_cfg: dict[str, Any], config: dict[str, Any], out: str):
    """W&B through Ray's integration, rank 0 only: offline unless logger.mode=online or a key is set."""
    if logger_cfg.get("name", "none") != "wandb":
        return None
    from ray.air.integrations.wandb import setup_wandb

    mode = str(logger_cfg.get("mode", "auto"))
    if mode == "auto":  # an explicit $WANDB_MODE wins; else online only with an API key
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir = out if is_local(out) else tempfile.mkdtemp(prefix="wandb-")
    run_id = "dermaid-" + hashlib.sha1(out.encode()).hexdigest()[:12]  # the same id when a run resumes
    return setup_wandb(
        config=config["config"], project=logger_cfg.get("project", "dermaid"),
        trial_id=run_id, trial_name=os.path.basename(out.rstrip("/")), group=logger_cfg.get("group"),
        dir=wandb_dir, mode=mode, rank_zero_only=False,
    )
