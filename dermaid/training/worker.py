"""Training on Ray Train, the worker side: `train_fn_per_worker(config)` and its helpers.

Each Ray Train worker (started by dermaid.training.driver) reads its own shard of the prepared
version, builds the model (DDP), calls loop.py once per epoch, gathers the validation predictions,
and reports metrics + a checkpoint with `ray.train.report`; it resumes from
`ray.train.get_checkpoint()` when one exists. Only rank 0 logs, writes cards and saves:
DIR/last/ every epoch, DIR/best/ when val/balanced_accuracy improved, DIR/history.csv.
With `optim.ema_decay`, an EMA of the weights is what is validated and what every checkpoint stores
(the raw weights travel in Ray's train state, for resuming).

A loss hook named by `train.loss_hook` (dermaid.training.hooks; e.g. distillation from
dermaid.compress) replaces the loss and may add a frozen teacher.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dermaid.classes import NUM_CLASSES
from dermaid.files import exists, is_local, join, write_text
from dermaid.ray_compat import quiet_train_report_log
from dermaid.training.history import format_epoch_line, write_history
from dermaid.training.worker_config import WorkerConfig

SCORE_METRIC = "val/balanced_accuracy"  # early stopping, best checkpoint and CheckpointConfig score
TRAIN_STATE_FILE = "train_state.pt"
FAIL_MARKER = ".fail_injected"


@dataclass
class _Trainee:
    """What one worker trains with: the model (DDP-wrapped and plain), data, optimisation and loss."""

    ddp_model: torch.nn.Module
    model: torch.nn.Module  # the unwrapped model: validated, saved and loaded
    input_spec: dict[str, Any]
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: torch.nn.Module
    teacher: torch.nn.Module | None
    card_fields: dict[str, Any]
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    ema: Any | None = None  # timm ModelEmaV3 when optim.ema_decay is set

    @property
    def kept(self) -> torch.nn.Module:
        """The weights validated and checkpointed: the EMA's when there is one, else the trained model."""
        return self.ema.module if self.ema is not None else self.model


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its data shard, the model (DDP), one loop.py epoch at a time, reports."""
    import ray.train

    cfg = WorkerConfig.parse(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    quiet_train_report_log(cfg.log_level)
    checkpoint = ray.train.get_checkpoint()  # set when a restarted worker group (or out=) resumes
    trainee = _build_trainee(cfg, rank, world, fresh=checkpoint is None)
    state = _resume(trainee, checkpoint, rank)
    run = _start_wandb(cfg) if rank == 0 else None
    epochs, patience = cfg.train.epochs, cfg.train.early_stopping_patience
    # no epochs left when a resumed run had already finished or stopped early
    first_epoch = epochs + 1 if patience and state["bad_epochs"] >= patience else state["epoch"] + 1
    for epoch in range(first_epoch, epochs + 1):
        _maybe_inject_failure(cfg, epoch, rank, world)
        row, details, temperature, improved = _run_epoch(cfg, trainee, state, epoch, world)
        if rank == 0:
            _report_rank0(cfg, trainee, state, row, details, temperature, improved, run)
        else:
            ray.train.report(row, checkpoint=None)
        if patience and state["bad_epochs"] >= patience and epoch < epochs:
            if rank == 0:
                _console(f"early stopping: no {SCORE_METRIC} gain for {patience} epochs "
                         f"(best {state['best_score']:.4f} at epoch {state['best_epoch']})")
            break
    if run is not None:
        run.finish()


# ---------------------------------------------------------------------------------------------
# Set-up: device, model, data, optimiser, loss


def _build_trainee(cfg: WorkerConfig, rank: int, world: int, fresh: bool) -> _Trainee:
    """Everything one worker trains with; `fresh`: no Ray checkpoint to resume (a fine-tune loads init_from)."""
    import ray.train.torch

    from dermaid.models.card import load_state_dict
    from dermaid.models.classifier import create_classifier, resolve_input_spec
    from dermaid.training import loop

    # intra-op threads: the config's, else the worker's whole CPUs (never more threads than cores reserved)
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    amp_dtype = loop.resolve_amp_dtype(cfg.train.amp, device)
    channels_last = loop.resolve_channels_last(cfg.train.channels_last, device)

    # identical init on every rank; DDP also broadcasts rank 0's weights
    loop.set_seed(cfg.seed)
    # starting weights (hub or model.pretrained_file) only for a fresh run: a fine-tune or resume replaces them
    model = create_classifier(cfg.model.model_dump(), pretrained_weights=fresh and not cfg.train.init_from)
    input_spec = resolve_input_spec(model, cfg.train.image_size)
    if fresh and cfg.train.init_from:
        model.load_state_dict(load_state_dict(cfg.train.init_from))
    loop.set_seed(cfg.seed + 1000 * rank)  # per-worker augmentation and dropout streams

    train_loader, val_loader, class_counts = _create_loaders(cfg, input_spec, rank, world, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = loop.create_ema(model.to(device), cfg.optim.ema_decay)  # on the device, before DDP wraps it (timm's order)
    ddp_model = ray.train.torch.prepare_model(model)
    plain_model = ddp_model.module if hasattr(ddp_model, "module") else ddp_model
    optimizer, scheduler = _create_optimisation(cfg, ddp_model, len(train_loader))
    loss_fn, teacher, card_fields = _create_loss(cfg, class_counts, input_spec, device)
    return _Trainee(
        ddp_model=ddp_model, model=plain_model, input_spec=input_spec, train_loader=train_loader,
        val_loader=val_loader, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
        loss_fn=loss_fn, teacher=teacher, card_fields=card_fields, device=device, amp_dtype=amp_dtype,
        channels_last=channels_last, ema=ema,
    )


def _create_loaders(cfg: WorkerConfig, input_spec: dict[str, Any], rank: int, world: int,
                    device: torch.device) -> tuple[Any, Any, list[int]]:
    """This worker's shard of the prepared version: (train loader, val loader, training class counts)."""
    from dermaid.data.torch_dataset import (
        LesionDataset, create_eval_loader, create_train_loader, pad_records, read_worker_records,
    )
    from dermaid.data.transforms import create_train_transform

    data, batch_size = cfg.data, cfg.train.batch_size
    train_records, train_info = read_worker_records(data.version_url, "train", data.fold, rank, world)
    train_records = pad_records(train_records, train_info["per_rank"])
    val_records, _ = read_worker_records(data.version_url, "val", data.fold, rank, world)
    augment = create_train_transform(input_spec, cfg.augment.model_dump())
    on_device = _input_path(cfg.config["data"]["loader"], device) == "gpu"
    train_set = LesionDataset(train_records, None if on_device else augment, raw=on_device)
    sampling = "balanced" if cfg.train.imbalance == "balanced_sampler" else "shuffle"
    pin = device.type == "cuda"
    train_loader = create_train_loader(train_set, batch_size, sampling, train_info["class_counts"],
                                       cfg.seed + rank, num_workers=cfg.train.loader_workers, pin_memory=pin)
    if on_device:  # loader workers only slice JPEG bytes; decode + augment run on the GPU (nvJPEG, torch)
        from dermaid.data.gpu_transforms import DeviceAugmentLoader

        train_loader = DeviceAugmentLoader(train_loader, augment, device)
    val_loader = create_eval_loader(val_records, input_spec, batch_size=batch_size * 2,
                                    num_workers=cfg.train.loader_workers, pin_memory=pin)
    return train_loader, val_loader, train_info["class_counts"]


def _input_path(loader: str, device: torch.device) -> str:
    """`data.loader` -> "gpu" (decode + augment on the device) or "cpu" (in the DataLoader workers, OpenCV)."""
    from dermaid.errors import DermaidError

    if loader == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if loader not in ("cpu", "gpu"):
        raise DermaidError(f"data.loader={loader!r}: expected auto, cpu or gpu")
    if loader == "gpu" and device.type != "cuda":
        raise DermaidError(f"data.loader=gpu decodes on a CUDA device; this worker trains on {device.type} "
                           "(use data.loader=auto or cpu, or scaling=gpu1|gpu4)")
    return loader


def _create_optimisation(cfg: WorkerConfig, ddp_model: torch.nn.Module, steps_per_epoch: int):
    """AdamW (with layer-wise lr decay when set) and its per-batch warm-up + cosine schedule, from `optim`."""
    from dermaid.training import loop

    optim = cfg.optim
    optimizer = loop.create_optimizer(ddp_model, optim.lr, optim.weight_decay, optim.betas, optim.backbone_lr_scale,
                                      optim.layer_decay)
    scheduler = loop.create_cosine_schedule(optimizer, cfg.train.epochs * steps_per_epoch,
                                            optim.warmup_epochs * steps_per_epoch, optim.min_lr_ratio)
    return optimizer, scheduler


def _create_loss(cfg: WorkerConfig, class_counts: list[int], input_spec: dict[str, Any],
                 device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]]:
    """(loss_fn, teacher or None, extra card fields): class-weighted CE, or what train.loss_hook makes of it."""
    from dermaid.training import loop
    from dermaid.training.hooks import load_loss_hook

    weights = None
    if cfg.train.imbalance == "weighted_loss":
        weights = loop.compute_class_weights(class_counts, cfg.train.class_weight_power).to(device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing)
    if cfg.loss_hook is None:
        return loss_fn, None, {}
    hook = load_loss_hook(cfg.loss_hook.path)(cfg.loss_hook.settings)
    loss_fn, teacher = hook.create_loss(loss_fn, input_spec, device)
    return loss_fn, teacher, hook.card_fields()


def _resume(trainee: _Trainee, checkpoint, rank: int) -> dict[str, Any]:
    """The epoch state: fresh, or loaded (with model, optimiser, schedule, scaler) from a Ray checkpoint."""
    from dermaid.models.card import load_state_dict

    state: dict[str, Any] = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0,
                             "history": [], "attempt": 1}
    if checkpoint is None:
        return state
    with checkpoint.as_directory() as ckpt_dir:
        kept = load_state_dict(ckpt_dir)  # the checkpoint's weights: the EMA's when the run keeps one
        saved = torch.load(os.path.join(ckpt_dir, TRAIN_STATE_FILE), map_location="cpu", weights_only=False)
    trainee.model.load_state_dict(saved.get("model") or kept)  # the raw trained weights, saved beside an EMA
    if trainee.ema is not None:
        trainee.ema.module.load_state_dict(kept if saved.get("model") else trainee.model.state_dict())
    trainee.optimizer.load_state_dict(saved["optimizer"])
    trainee.scheduler.load_state_dict(saved["scheduler"])
    if trainee.scaler is not None and saved["scaler"]:
        trainee.scaler.load_state_dict(saved["scaler"])
    state = {**saved["state"], "attempt": saved["state"]["attempt"] + 1}
    if rank == 0:
        _console(f"resumed from the checkpoint of epoch {state['epoch']} (attempt {state['attempt']})")
    return state


# ---------------------------------------------------------------------------------------------
# One epoch: train, validate on every worker's shard, keep score


def _run_epoch(cfg: WorkerConfig, trainee: _Trainee, state: dict[str, Any], epoch: int,
               world: int) -> tuple[dict[str, Any], dict, float, bool]:
    """Train one epoch, validate; updates `state`; returns (history row, metric table, temperature, improved)."""
    import torch.distributed as dist

    from dermaid.training import loop

    started = time.perf_counter()
    trainee.train_loader.sampler.set_epoch(epoch)
    stats = loop.train_one_epoch(
        trainee.ddp_model, trainee.train_loader, trainee.optimizer, trainee.scheduler, trainee.loss_fn,
        trainee.device, trainee.amp_dtype, trainee.channels_last, trainee.scaler,
        metadata_dropout=cfg.model.metadata_dropout if cfg.model.use_metadata else 0.0,
        grad_clip=cfg.train.grad_clip, max_steps=cfg.train.max_steps_per_epoch, teacher=trainee.teacher,
        ema=trainee.ema,
    )
    train_loss = _mean_over_workers(stats["loss"] * stats["samples"], stats["samples"], trainee.device, dist)
    _broadcast_buffers(trainee.model, dist)  # BatchNorm statistics of rank 0: the model that is saved
    if trainee.ema is not None:
        _broadcast_buffers(trainee.ema.module, dist)  # ... and of its EMA, averaged from each rank's own
    logits, labels = loop.predict_logits(trainee.kept, trainee.val_loader, trainee.device, trainee.amp_dtype,
                                         trainee.channels_last)
    logits, labels = _gather(logits[:, 0], labels, dist)  # (N_val, K), (N_val,) in shard order
    metrics, details, temperature = _epoch_metrics(logits, labels)
    row = {"epoch": epoch, "attempt": state["attempt"], "train/loss": train_loss, **metrics,
           "lr": max(g["lr"] for g in trainee.optimizer.param_groups), "seconds": time.perf_counter() - started,
           "train/images_per_s": stats["images_per_s"] * world}
    score = row[SCORE_METRIC]
    improved = not math.isnan(score) and score > state["best_score"] + cfg.train.min_delta
    state["history"].append(row)
    state.update(epoch=epoch)
    if improved:
        state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return row, details, temperature, improved


def _report_rank0(cfg: WorkerConfig, trainee: _Trainee, state: dict[str, Any], row: dict[str, Any], details: dict,
                  temperature: float, improved: bool, run) -> None:
    """Rank 0: DIR/last (and DIR/best), history.csv, the console line, W&B, and Ray's checkpoint + report."""
    import ray.train

    epoch = row["epoch"]
    card = _epoch_card(cfg, trainee, row, details, temperature)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = _write_ray_checkpoint(tmp, card, trainee, state)
        _save_run_checkpoints(cfg.out, card, trainee.kept, improved)
        write_history(cfg.out, state["history"])
        _console(format_epoch_line(row, cfg.train.epochs, improved))
        if run is not None:
            run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))


def _console(line: str) -> None:
    """One progress line on the driver's console: the worker's raw stdout (Ray Train's print patch
    would log it twice: to its logger and, through Ray's wrapped stdout, to the console)."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def _epoch_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], dict, float]:
    """Validation logits -> (flat val/* metrics, the full metric table, the fitted temperature)."""
    from dermaid.evaluation.calibration import calibration_report
    from dermaid.evaluation.metrics import compute_metrics, flatten_metrics

    z, y = logits.numpy().astype(np.float64), labels.numpy()  # (N, K), (N,)
    calibration = calibration_report(z, y)
    probs = torch.softmax(torch.as_tensor(z), dim=-1).numpy()  # (N, K)
    details = compute_metrics(y, probs)
    row = {"val/loss": calibration["nll"], **flatten_metrics(details, "val"),
           **{f"val/{k}": v for k, v in calibration.items()}}
    return row, details, calibration["temperature"]


# ---------------------------------------------------------------------------------------------
# Checkpoints: Ray's (for resume) and the run directory's best/ and last/


def _epoch_card(cfg: WorkerConfig, trainee: _Trainee, row: dict[str, Any], details: dict, temperature: float):
    from dermaid.evaluation.metrics import json_safe
    from dermaid.models.card import build_card

    return build_card(
        cfg.model.model_dump(), trainee.input_spec,
        dataset_version=cfg.data.version,
        dataset_versions=cfg.dataset_versions,
        config=cfg.config,
        metrics=json_safe({**row, "val": details}),
        temperature=temperature,
        epoch=row["epoch"],
        preparation=cfg.data.preparation,
        **trainee.card_fields,
    )


def _write_ray_checkpoint(tmp: str, card, trainee: _Trainee, state: dict[str, Any]) -> str:
    """A Ray checkpoint that is also a DermAID checkpoint (card.json + model.pt: the kept weights) plus the
    train state (with the raw trained weights when model.pt holds the EMA's)."""
    from dermaid.models.card import save_checkpoint

    ckpt_dir = os.path.join(tmp, "checkpoint")
    save_checkpoint(ckpt_dir, card, trainee.kept.state_dict())
    torch.save({
        "model": trainee.model.state_dict() if trainee.ema is not None else None,
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "scaler": trainee.scaler.state_dict() if trainee.scaler is not None else None,
        "state": state,
    }, os.path.join(ckpt_dir, TRAIN_STATE_FILE))
    return ckpt_dir


def _save_run_checkpoints(out: str, card, model: torch.nn.Module, improved: bool) -> None:
    """DIR/last every epoch, DIR/best when the score improved (each written atomically)."""
    from dermaid.models.card import save_checkpoint

    state_dict = model.state_dict()
    save_checkpoint(join(out, "last"), card, state_dict)
    if improved:
        save_checkpoint(join(out, "best"), card, state_dict)


# ---------------------------------------------------------------------------------------------
# Collectives: every rank sees the same numbers


def _mean_over_workers(total: float, count: int, device: torch.device, dist) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return total / max(1, count)
    buf = torch.tensor([total, float(count)], dtype=torch.float64, device=device)  # (2,)
    dist.all_reduce(buf)
    return float(buf[0] / buf[1].clamp(min=1))


def _broadcast_buffers(model: torch.nn.Module, dist) -> None:
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


# ---------------------------------------------------------------------------------------------
# Tests' failure injection and W&B


def _maybe_inject_failure(cfg: WorkerConfig, epoch: int, rank: int, world: int) -> None:
    """Tests only (train.fail_at_epoch): the last worker raises once at the start of that epoch."""
    fail_at = cfg.train.fail_at_epoch
    if not fail_at or epoch != fail_at or rank != world - 1:
        return
    marker = join(cfg.out, FAIL_MARKER)
    if exists(marker):
        return
    write_text(marker, f"failure injected at epoch {epoch}\n")
    raise RuntimeError(f"injected worker failure at epoch {epoch} (train.fail_at_epoch)")


def _start_wandb(cfg: WorkerConfig):
    """W&B through Ray's integration, rank 0 only: offline unless logger.mode=online or a key is set."""
    if cfg.logger.name != "wandb":
        return None
    from ray.air.integrations.wandb import setup_wandb

    out, mode = cfg.out, cfg.logger.mode
    if mode == "auto":  # an explicit $WANDB_MODE wins; else online only with an API key
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir = out if is_local(out) else tempfile.mkdtemp(prefix="wandb-")
    run_id = "dermaid-" + hashlib.sha1(out.encode()).hexdigest()[:12]  # the same id when a run resumes
    return setup_wandb(
        config=cfg.config, project=cfg.logger.project, trial_id=run_id,
        trial_name=os.path.basename(out.rstrip("/")), group=cfg.logger.group, dir=wandb_dir, mode=mode,
        rank_zero_only=False,
    )
