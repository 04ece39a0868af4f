"""Driving a search: `dermaid tune` -> a Ray Tune Tuner whose trials each run the `dermaid train` trainer.

    dermaid tune hparams_search=toy                         # 4 trials on the toy set (runs/tune/toy)
    dermaid tune hparams_search=toy resume=true             # continue an interrupted search in the same out=
    dermaid tune hparams_search=isic_effnet tune=optuna scaling=gpu1 data.root=gs://bucket/isic2019

`tune(cfg)` checks the search space before Ray starts, prepares the dataset once, saves the resolved base
config (what resume=true continues with), then fits `Tuner(train_driver_fn, param_space=...)` or restores
an interrupted one. `train_driver_fn` runs in a Tune actor per trial: it applies the sampled values to the
base config and calls the same `train()` as `dermaid train`, with TuneReportCallback forwarding each
epoch's metrics to Tune, where ASHA compares trials and stops weak ones.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.config import conf_dir, to_plain
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, join, read_text, write_text
from dermaid.processes import sigint_handler_kept
from dermaid.tuning.layout import BASE_CONFIG_FILE, TUNE_DIR_NAME, trial_run_dir
from dermaid.tuning.space import apply_trial_config, build_search_space

def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid tune hparams_search=NAME [resume=true] ...`: search, print the results table and the best trial."""
    summary = tune(cfg)
    if summary["interrupted"]:
        print(f"\ninterrupted: {summary['finished']} of {summary['num_trials']} trials finished. "
              f"Continue with: dermaid tune hparams_search={summary['search']} out={summary['out']} resume=true")
        sys.exit(130)
    return summary


def tune(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) a search; write DIR/results.csv, DIR/best/, DIR/summary.json; returns the summary."""
    from dermaid.ray_runtime import ensure_ray
    from dermaid.training.worker_config import TrainConfig
    from dermaid.data.prepare import check_raw_roots
    from dermaid.tuning.summary import finish_search

    plain = to_plain(cfg)
    out = absolute_url(plain["out"])
    resume = bool(plain["resume"])
    base = _saved_base(out) if resume else _checked_new_search(plain, out)
    # checked before Ray starts or any data is touched: the search space, then the train config it varies
    space, groups = build_search_space(base["hparams_search"], base)
    TrainConfig.parse(base)  # a wrong or missing train key fails here, with its name, not in the first trial
    check_raw_roots(base["data"])  # a wrong data.root is said before Ray starts
    ray_settings = TrainConfig.parse(plain).ray  # how this invocation reaches Ray (also when resuming)
    ensure_ray(ray_settings.address, ray_settings.num_cpus, log_to_driver=True)
    if not resume:
        base = _prepare_base(plain, out)
    _check_resources(base)
    if not resume:
        write_text(join(out, BASE_CONFIG_FILE), OmegaConf.to_yaml(OmegaConf.create(base)))
    started = time.time()
    tuner = _build_tuner(out, base, space, groups, resume)
    with sigint_handler_kept():
        grid = tuner.fit()  # TuningCallback writes DIR/results.csv as trials end and when the experiment ends
    return finish_search(out, base, grid, time.time() - started)


def train_driver_fn(config: dict[str, Any], base: dict[str, Any], groups: dict[str, dict]) -> None:
    """The Tune trainable: one `dermaid train` run (same TorchTrainer) with this trial's values.

    Its run directory is DIR/trials/<trial_id>; Train resumes it from its own checkpoints when the
    trial is restored. Epoch metrics reach Tune through TuneReportCallback.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dermaid.ray_compat import train_worker_start_timeout_env
    from dermaid.training.driver import train

    # Ray Train reads this when a trial's trainer starts its worker group; on a busy machine starting the
    # worker processes can outlast Train's 60 s default, and each timeout restarts them all.
    for key, value in train_worker_start_timeout_env(base["tune"]["worker_start_timeout_s"]).items():
        os.environ.setdefault(key, value)
    plain = apply_trial_config(base, config, groups)
    plain["out"] = trial_run_dir(base["out"], ray.tune.get_context().get_trial_id())
    train(plain, callbacks=[TuneReportCallback()])


def _saved_base(out: str) -> dict[str, Any]:
    """resume=true: the base config the interrupted search saved (new overrides are ignored)."""
    if not exists(join(out, BASE_CONFIG_FILE)):
        raise DermaidError(f"resume=true: out={out} holds no tuning run to continue "
                           f"(no {BASE_CONFIG_FILE}); run without resume=true to start one")
    print(f"resuming the search in {out} with its saved configuration (new overrides are ignored)")
    return OmegaConf.to_container(OmegaConf.create(read_text(join(out, BASE_CONFIG_FILE))), resolve=True)


def _checked_new_search(plain: dict[str, Any], out: str) -> dict[str, Any]:
    """A new search: out= must be free and a search space chosen (hparams_search has no default)."""
    if exists(join(out, BASE_CONFIG_FILE)):
        raise DermaidError(f"out={out} holds a tuning run already: pass resume=true to continue it, "
                           "or choose another out=")
    if not plain.get("hparams_search"):  # absent unless chosen: conf/tune.yaml defaults it to null
        options = sorted(p.stem for p in (conf_dir() / "hparams_search").glob("*.yaml"))
        raise DermaidError(f"hparams_search= is required: the search space to explore (one of {options})")
    return plain


def _prepare_base(plain: dict[str, Any], out: str) -> dict[str, Any]:
    """The resolved config every trial starts from (training.driver.prepared_base), its W&B group named."""
    from dermaid.training.driver import prepared_base

    base, _ = prepared_base(plain, out)
    logger = base["logger"]
    if logger["name"] == "wandb" and not logger["group"]:
        search_name = base["hparams_search"].get("name", "search")  # as conf/tune.yaml's out= when unnamed
        logger["group"] = f"tune-{search_name}-{os.path.basename(out.rstrip('/'))}"
    return base


def _check_resources(base: dict[str, Any]) -> None:
    """A trial needs its driver CPU plus every worker's resources at once; refuse a search that never fits."""
    import ray

    from dermaid.training.driver import build_scaling_config

    scaling = base["scaling"]
    workers = build_scaling_config(scaling).total_resources  # what the trial's TorchTrainer will reserve
    need_cpu = float(base["tune"]["trial_cpus"]) + workers.get("CPU", 0)
    need_gpu = workers.get("GPU", 0)
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        raise DermaidError(
            f"one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU (tune.trial_cpus + scaling: "
            f"{scaling['num_workers']} workers) but the Ray cluster has {have.get('CPU', 0):g} CPU and "
            f"{have.get('GPU', 0):g} GPU; lower scaling.num_workers / cpus_per_worker or use a larger cluster")


def _build_tuner(out: str, base: dict[str, Any], space: dict[str, Any], groups: dict[str, dict], resume: bool):
    """A new Tuner over `space`, or the interrupted one restored from DIR/tune (unfinished trials resumed)."""
    import ray.tune

    from dermaid.tuning.callbacks import TuningCallback
    from dermaid.tuning.tune_config import build_tune_config

    tune_cfg = base["tune"]
    trainable = ray.tune.with_resources(ray.tune.with_parameters(train_driver_fn, base=base, groups=groups),
                                        {"CPU": float(tune_cfg["trial_cpus"])})
    tune_path = join(out, TUNE_DIR_NAME)
    if resume:
        if not ray.tune.Tuner.can_restore(tune_path):
            raise DermaidError(f"resume=true: {tune_path} holds no Ray Tune experiment state to restore "
                               f"(interrupted before the first trial started?); remove {out} to start over")
        return ray.tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, param_space=space)
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=build_tune_config(tune_cfg, space, max_t=int(base["train"]["epochs"])),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR_NAME,
            storage_path=out,
            callbacks=[TuningCallback(out, tune_cfg["metric"], tune_cfg["mode"], list(space))],
            failure_config=ray.tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )
