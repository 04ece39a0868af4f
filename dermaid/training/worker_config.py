"""The typed training config: what the driver reads from the composed `train` config and hands to workers.

    settings = TrainConfig.parse(to_plain(cfg))        # the driver, before Ray starts or data is touched
    config = WorkerConfig.parse(train_loop_config)     # each Ray Train worker, first thing

Every value comes from the composed Hydra config (conf/train.yaml and its groups), never from a default
written here: a section field without a default is required, so a missing or mistyped key fails at start
with its dotted name (`train.epochs: Field required`). Fields with a default are the few that some config
groups leave out on purpose (`scaling.gpus_per_worker` on CPU, `logger.project` with logger=none).
Workers receive `WorkerConfig.model_dump()`: plain values only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from dermaid.errors import DermaidError


class _Section(BaseModel):
    """A config group: every key required, unknown keys refused (a typo fails, it is not ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """The `model` group (conf/model/): the classifier's architecture and its training-only dropout."""

    name: str
    pretrained: bool
    pretrained_file: str | None
    use_metadata: bool
    metadata_hidden: int
    metadata_dropout: float
    drop_rate: float


class TrainSettings(_Section):
    """The `train` block of conf/train.yaml."""

    epochs: int
    batch_size: int
    image_size: int | None
    imbalance: Literal["weighted_loss", "balanced_sampler", "none"]
    class_weight_power: float
    label_smoothing: float
    early_stopping_patience: int
    min_delta: float
    amp: str | bool  # YAML reads a bare `off` as false
    channels_last: Literal["auto"] | bool
    grad_clip: float | None
    loader_workers: int
    torch_threads: int | None
    max_steps_per_epoch: int | None
    init_from: str | None
    fail_at_epoch: int | None
    loss_hook: str | None


class OptimSettings(_Section):
    """The `optim` group (conf/optim/)."""

    name: str
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_epochs: float
    min_lr_ratio: float
    backbone_lr_scale: float
    layer_decay: float | None
    ema_decay: float | None


class BrightnessContrastSettings(_Section):
    p: float
    brightness: float
    contrast: float


class BlurSettings(_Section):
    p: float
    limit: int
    noise_var: tuple[float, float]


class DistortionSettings(_Section):
    p: float
    optical: float
    grid: float
    grid_steps: int
    elastic_alpha: float
    elastic_sigma: float


class ClaheSettings(_Section):
    p: float
    clip_limit: float
    grid: int


class HsvSettings(_Section):
    p: float
    hue: float
    saturation: float
    value: float


class ShiftScaleRotateSettings(_Section):
    p: float
    shift: float
    scale: float
    rotate: float


class CutoutSettings(_Section):
    p: float
    size: float
    holes: int


class AugmentSettings(_Section):
    """The `augment` group (conf/augment/): dermaid.data.transforms.create_train_transform reads it."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    vflip: bool
    transpose: bool
    rotation: float
    color_jitter: float
    brightness_contrast: BrightnessContrastSettings
    blur: BlurSettings
    distortion: DistortionSettings
    clahe: ClaheSettings
    hsv: HsvSettings
    shift_scale_rotate: ShiftScaleRotateSettings
    cutout: CutoutSettings


class ScalingSettings(_Section):
    """The `scaling` group (conf/scaling/): Ray Train's ScalingConfig."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float | None = None  # absent on CPU configs; with use_gpu, Ray's own default (1) applies
    placement_strategy: str


class RunSettings(_Section):
    """The `run` group (conf/run/): RunConfig, CheckpointConfig, FailureConfig."""

    keep_checkpoints: int
    max_failures: int
    log_level: str
    shared_storage: bool  # local paths are on storage every node sees (NFS): dermaid.training.driver.check_shared_storage


class RaySettings(_Section):
    """The `ray` group (conf/ray/): how the driver reaches Ray (dermaid.ray_runtime.ensure_ray)."""

    address: str | None
    num_cpus: int | None


class LoggerSettings(_Section):
    """The `logger` group (conf/logger/): logger=none has only `name`; logger=wandb needs the rest."""

    name: Literal["none", "wandb"]
    project: str | None = None
    group: str | None = None
    mode: str | None = None

    @model_validator(mode="after")
    def _wandb_keys(self) -> LoggerSettings:
        if self.name == "wandb":
            for key in ("project", "mode"):
                if getattr(self, key) is None:
                    raise ValueError(f"logger=wandb needs logger.{key}")
        return self


class TrainConfig(BaseModel):
    """The driver's view of a composed `train` config (other top-level keys, e.g. `distill`, pass through)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    out: str
    seed: int
    data: dict[str, Any]
    model: ModelSettings
    train: TrainSettings
    optim: OptimSettings
    augment: AugmentSettings
    scaling: ScalingSettings
    run: RunSettings
    ray: RaySettings
    logger: LoggerSettings

    @classmethod
    def parse(cls, plain: dict[str, Any]) -> TrainConfig:
        return parse_config(cls, plain, "train config")


class DataRef(_Section):
    """The prepared dataset version a worker reads its shard of."""

    version_url: str
    version: str
    fold: int
    preparation: dict[str, Any] | None = None  # the card's block: dermaid.data.shards.preparation_block(settings)


class LossHookRef(_Section):
    """A loss hook (dermaid.training.hooks): its import path and the settings its `prepare` returned."""

    path: str
    settings: dict[str, Any]


class WorkerConfig(_Section):
    """`train_fn_per_worker(config)`: everything a worker needs, resolved by the driver."""

    out: str
    seed: int
    model: ModelSettings
    train: TrainSettings
    optim: OptimSettings
    augment: AugmentSettings
    logger: LoggerSettings
    use_gpu: bool
    cpus_per_worker: float
    log_level: str
    data: DataRef
    dataset_versions: list[str]
    loss_hook: LossHookRef | None
    config: dict[str, Any]  # the resolved config: written into every model card

    @classmethod
    def parse(cls, plain: dict[str, Any]) -> WorkerConfig:
        return parse_config(cls, plain, "worker config")


def parse_config(schema: type[BaseModel], plain: dict[str, Any], what: str):
    """schema.model_validate(plain); a DermaidError naming `what` and every wrong or missing key (dotted)."""
    try:
        return schema.model_validate(plain)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}"
                             for err in exc.errors())
        raise DermaidError(f"{what}: {problems}") from None
