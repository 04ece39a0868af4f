"""Hyperparameter search with Ray Tune over the `dermaid train` trainer.

    dermaid tune hparams_search=toy                         # 4 trials on the toy set (runs/tune/toy)
    dermaid tune hparams_search=toy resume=true             # continue an interrupted search in the same out=
    dermaid tune hparams_search=isic_effnet tune=optuna scaling=gpu1 data.root=gs://bucket/isic2019

Shape (the Tune + Train pattern of Ray 2.x, Train V2): `Tuner(train_driver_fn, param_space=...)` runs
one *driver function* per trial; it applies the sampled values to the composed train config and calls
`dermaid.training.train.train` (the same `build_trainer(cfg).fit()` as `dermaid train`), so each trial
is itself a distributed TorchTrainer run. `TuneReportCallback` forwards every epoch's metrics to Tune,
where ASHA compares trials and stops weak ones (their actors, and so their workers, are freed).

A search space (conf/hparams_search/*.yaml, `hparams_search.space`) maps dotted config keys to Tune's
sampling functions: `optim.lr: {loguniform: [1e-4, 1e-2]}`, `model.name: {choice: [...]}`; a bare
config-group name (`augment: {choice: [none, light]}`) chooses among that group's options. The space
is checked before any trial starts (unknown key, unknown backbone, empty range -> DermaidError).

out=DIR holds:
    DIR/results.csv       one row per trial: status, epochs, best metrics, `config/<key>` columns
    DIR/best/             the best trial's best checkpoint + model card (for `dermaid evaluate` / `serve`)
    DIR/summary.json      best trial, its overrides and metrics; DIR/trials.log (trial start/end events)
    DIR/trials/<id>/      each trial's `dermaid train` run directory (best/, last/, history.csv, ...)
    DIR/tune/             Ray Tune's experiment state (what resume=true restores)
    DIR/tune_config.yaml  the resolved base config (a resumed search uses it, not new overrides)
Decision support for research only; never a diagnosis.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.classes import DISCLAIMER
from dermaid.config import conf_dir, to_plain
from dermaid.errors import DermaidError
from dermaid.processes import sigint_handler_kept
from dermaid.files import absolute_url, atomic_dir, exists, join, read_bytes, read_text, write_bytes, write_text

TUNE_DIR_NAME = "tune"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
TRIALS_LOG = "trials.log"
BASE_CONFIG_FILE = "tune_config.yaml"
CONFIG_PREFIX = "config/"  # results.csv hyperparameter columns (Ray's ResultGrid.get_dataframe() layout)
ORPHAN_SWEEP_S = 120.0  # after a trial stops, look this long for its worker placement group to free

# sampler -> (number of arguments, Tune function name). Arguments follow Tune's signatures.
SAMPLERS: dict[str, tuple[int | None, str]] = {
    "uniform": (2, "uniform"),
    "loguniform": (2, "loguniform"),
    "quniform": (3, "quniform"),
    "qloguniform": (3, "qloguniform"),
    "randint": (2, "randint"),        # [low, high): high excluded, as in tune.randint
    "choice": (None, "choice"),
    "grid_search": (None, "grid_search"),
}
# Config groups whose options a search may choose between (a bare key in the space).
SEARCHABLE_GROUPS = ("augment", "model", "optim")
# Keys a search must not touch: they name where things go, not how a model trains.
FORBIDDEN_KEYS = ("out", "paths", "data", "scaling", "run", "logger", "tune", "hparams_search", "resume")


# ---------------------------------------------------------------------------------------------
# Entry points


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
    import ray.tune

    from dermaid.training.train import _ensure_ray

    plain = to_plain(cfg)
    out = absolute_url(plain["out"])
    resume = bool(plain.get("resume", False))
    tune_path = join(out, TUNE_DIR_NAME)
    if resume:
        if not exists(join(out, BASE_CONFIG_FILE)):
            raise DermaidError(f"resume=true: out={out} holds no tuning run to continue "
                               f"(no {BASE_CONFIG_FILE}); run without resume=true to start one")
        base = OmegaConf.to_container(OmegaConf.create(read_text(join(out, BASE_CONFIG_FILE))), resolve=True)
        print(f"resuming the search in {out} with its saved configuration (new overrides are ignored)")
    else:
        if exists(join(out, BASE_CONFIG_FILE)):
            raise DermaidError(f"out={out} holds a tuning run already: pass resume=true to continue it, "
                               "or choose another out=")
        if not plain.get("hparams_search"):
            options = sorted(p.stem for p in (conf_dir() / "hparams_search").glob("*.yaml"))
            raise DermaidError(f"hparams_search= is required: the search space to explore (one of {options})")
        base = plain
    # the search space is checked before Ray starts or any data is touched
    space, groups = build_search_space(base["hparams_search"], base)
    _ensure_ray(plain.get("run", {}))
    if not resume:
        base = _prepare_base(plain, out)
    tune_cfg = base["tune"]
    _check_resources(base)
    if not resume:
        write_text(join(out, BASE_CONFIG_FILE), OmegaConf.to_yaml(OmegaConf.create(base)))

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(train_driver_fn, base=base, groups=groups),
        {"CPU": float(tune_cfg.get("trial_cpus", 0.1))},
    )
    started = time.time()
    if resume:
        if not ray.tune.Tuner.can_restore(tune_path):
            raise DermaidError(f"resume=true: {tune_path} holds no Ray Tune experiment state to restore "
                               f"(interrupted before the first trial started?); remove {out} to start over")
        tuner = ray.tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, param_space=space)
    else:
        tuner = ray.tune.Tuner(
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
    with sigint_handler_kept():
        tuner.fit()  # TuningCallback writes DIR/results.csv as trials end and when the experiment ends
    return _finish(out, base, list(space), time.time() - started)


def _prepare_base(plain: dict[str, Any], out: str) -> dict[str, Any]:
    """The resolved config every trial starts from: data prepared once, local paths absolute."""
    from dermaid.data.loading import read_manifest
    from dermaid.data.prepare import ensure_prepared

    search = plain["hparams_search"]
    base = json.loads(json.dumps(plain))  # a deep copy of plain values
    base["out"] = out
    data = base["data"]
    for key in ("root", "prepared_dir"):
        if data.get(key):
            data[key] = absolute_url(data[key])
    if base["train"].get("init_from"):
        base["train"]["init_from"] = absolute_url(base["train"]["init_from"])
    # Prepare (or resolve) the dataset version once, here: trials then only read it.
    version_url = ensure_prepared(data)
    data["version"] = read_manifest(version_url)["version"]
    logger = base.get("logger") or {}
    if logger.get("name") == "wandb" and not logger.get("group"):
        logger["group"] = f"tune-{search.get('name', 'search')}-{os.path.basename(out.rstrip('/'))}"
    return base


def _check_resources(base: dict[str, Any]) -> None:
    """A trial needs its driver CPU plus every worker's resources at once; refuse a search that never fits."""
    import ray

    scaling = base["scaling"]
    need_cpu = float(base["tune"].get("trial_cpus", 0.1)) + int(scaling["num_workers"]) * float(
        scaling.get("cpus_per_worker", 1))
    need_gpu = int(scaling["num_workers"]) * float(scaling.get("gpus_per_worker", 1)) if scaling.get("use_gpu") else 0
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        raise DermaidError(
            f"one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU (tune.trial_cpus + scaling: "
            f"{scaling['num_workers']} workers) but the Ray cluster has {have.get('CPU', 0):g} CPU and "
            f"{have.get('GPU', 0):g} GPU; lower scaling.num_workers / cpus_per_worker or use a larger cluster")


# ---------------------------------------------------------------------------------------------
# Search space: Hydra config -> Tune sampling functions (checked before any trial starts)


def build_search_space(search: dict[str, Any], base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """`hparams_search` -> (Tune param_space {dotted key: sampler}, {group: {option: group config}}).

    Raises DermaidError naming `hparams_search.space.<key>` for an unknown key, an unknown backbone,
    an unknown sampler or group option, and an empty or inverted range.
    """
    import ray.tune

    space_cfg = (search or {}).get("space") or {}
    if not isinstance(space_cfg, dict) or not space_cfg:
        raise DermaidError("hparams_search.space: empty; give at least one `key: {sampler: args}`")
    space: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, spec in space_cfg.items():
        where = f"hparams_search.space.{key}"
        sampler, args = _parse_spec(where, spec)
        if key.split(".")[0] in FORBIDDEN_KEYS:
            raise DermaidError(f"{where}: {key.split('.')[0]!r} is not a hyperparameter (it says where data, "
                               "runs or workers go); search optim, train, model or augment keys")
        if "." not in key:
            groups[key] = _group_options(where, key, args, sampler)
        else:
            _check_key(where, key, base)
        _check_values(where, key, sampler, args)
        space[key] = getattr(ray.tune, SAMPLERS[sampler][1])(*([args] if SAMPLERS[sampler][0] is None else args))
    return space, groups


def _parse_spec(where: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise DermaidError(f"{where}: expected one `sampler: args` pair (samplers: {sorted(SAMPLERS)}), got {spec!r}")
    sampler, args = next(iter(spec.items()))
    if sampler not in SAMPLERS:
        raise DermaidError(f"{where}: unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if not isinstance(args, list):
        raise DermaidError(f"{where}: {sampler} takes a list, got {args!r}")
    count = SAMPLERS[sampler][0]
    if count is None and not args:
        raise DermaidError(f"{where}: empty {sampler}: give at least one value")
    if count is not None and len(args) != count:
        raise DermaidError(f"{where}: {sampler} takes {count} numbers, got {args!r}")
    return sampler, args


def _check_key(where: str, key: str, base: dict[str, Any]) -> None:
    node: Any = base
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(key.split(".")[:i]) or "the train config"
            known = sorted(node) if isinstance(node, dict) else []
            raise DermaidError(f"{where}: unknown key {key!r} ({part!r} is not in {section}; known: {known})")
        node = node[part]
    if isinstance(node, dict):
        raise DermaidError(f"{where}: {key!r} is a section, not a value; search one of its keys {sorted(node)}")


def _check_values(where: str, key: str, sampler: str, args: list) -> None:
    if SAMPLERS[sampler][0] is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise DermaidError(f"{where}: {sampler} takes numbers, got {args!r}")
        low, high = args[0], args[1]
        if not low < high:
            raise DermaidError(f"{where}: empty range [{low}, {high}]: low must be below high")
        if "log" in sampler and low <= 0:
            raise DermaidError(f"{where}: {sampler} needs a positive low bound, got {low}")
        if sampler.startswith("q") and not 0 < args[2] <= high - low:
            raise DermaidError(f"{where}: step q={args[2]} must be positive and fit in [{low}, {high}]")
        if sampler == "randint" and not all(float(a).is_integer() for a in args):
            raise DermaidError(f"{where}: randint takes integers, got {args!r}")
    if key == "model.name":
        for name in args:
            _check_backbone(where, name)


def _check_backbone(where: str, name: Any) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{str(name)[:6]}*")[:5] if isinstance(name, str) else []
        raise DermaidError(f"{where}: unknown backbone {name!r} (not a timm model)"
                           + (f"; similar: {close}" if close else ""))


def _group_options(where: str, group: str, options: list, sampler: str) -> dict[str, Any]:
    """A bare key chooses between config-group options: load each conf/<group>/<option>.yaml."""
    if group not in SEARCHABLE_GROUPS:
        raise DermaidError(f"{where}: unknown key {group!r}: a bare key must be a config group "
                           f"({list(SEARCHABLE_GROUPS)}); for a value use its dotted key (e.g. optim.lr)")
    if sampler not in ("choice", "grid_search"):
        raise DermaidError(f"{where}: a config group takes choice or grid_search of its options, not {sampler}")
    folder = conf_dir() / group
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    loaded: dict[str, Any] = {}
    for option in options:
        if not isinstance(option, str) or option not in available:
            raise DermaidError(f"{where}: unknown {group} option {option!r}; available: {available}")
        values = OmegaConf.to_container(OmegaConf.load(folder / f"{option}.yaml"), resolve=True)
        values.pop("defaults", None)
        if group == "model":
            _check_backbone(where, values.get("name"))
        loaded[option] = values
    return loaded


def build_tune_config(tune_cfg: dict[str, Any], space: dict[str, Any], max_t: int):
    """TuneConfig: metric/mode, ASHA (or FIFO) scheduler, random or Optuna search, samples, budget."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    scheduler_cfg = tune_cfg.get("scheduler") or {"name": "fifo"}
    name = scheduler_cfg.get("name", "asha")
    if name == "asha":
        grace = int(scheduler_cfg.get("grace_period", 1))
        if not 0 < grace <= max_t:
            raise DermaidError(f"tune.scheduler.grace_period={grace}: must be between 1 and train.epochs={max_t}")
        # max_t one past the last epoch: a trial that reaches its last epoch ends on its own (its trainer
        # writes summary.json) rather than being stopped by the scheduler at the finish line
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1, grace_period=grace,
                                  reduction_factor=float(scheduler_cfg.get("reduction_factor", 2)))
    elif name == "fifo":
        scheduler = FIFOScheduler()
    else:
        raise DermaidError(f"tune.scheduler.name={name!r}: expected asha or fifo")

    search_cfg = tune_cfg.get("search_alg") or {"name": "random"}
    algorithm = search_cfg.get("name", "random")
    seed = int(tune_cfg.get("seed", 0))
    concurrency = int(tune_cfg.get("max_concurrent_trials") or 0)
    if algorithm == "random":
        # the variant generator limits concurrency itself (TuneConfig's limit only wraps Searchers)
        search_alg, concurrency = BasicVariantGenerator(random_state=seed, max_concurrent=concurrency), 0
    elif algorithm == "optuna":
        if any(isinstance(v, dict) and "grid_search" in v for v in space.values()):
            raise DermaidError("tune.search_alg=optuna cannot take grid_search dimensions; use choice")
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search_cfg.get("n_startup_trials", 4)))
        search_alg = OptunaSearch(sampler=sampler)
    else:
        raise DermaidError(f"tune.search_alg.name={algorithm!r}: expected random or optuna")

    budget = tune_cfg.get("time_budget_s")
    return ray.tune.TuneConfig(
        metric=tune_cfg["metric"],
        mode=tune_cfg["mode"],
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=int(tune_cfg["num_samples"]),
        max_concurrent_trials=concurrency or None,
        time_budget_s=float(budget) if budget else None,
    )


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Tune actor)


def apply_trial_config(base: dict[str, Any], sampled: dict[str, Any], groups: dict[str, dict]) -> dict[str, Any]:
    """The plain `dermaid train` config of one trial: base + sampled values (group choices replace the group)."""
    plain = json.loads(json.dumps(base))
    for key, value in sampled.items():
        if key in groups:
            plain[key] = json.loads(json.dumps(groups[key][value]))
            continue
        node = plain
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value
    return plain


def train_driver_fn(config: dict[str, Any], base: dict[str, Any], groups: dict[str, dict]) -> None:
    """The Tune trainable: one `dermaid train` run (same TorchTrainer) with this trial's values.

    Its run directory is DIR/trials/<trial_id>; Train resumes it from its own checkpoints when the
    trial is restored. Epoch metrics reach Tune through TuneReportCallback.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dermaid.training.train import train

    trial_id = ray.tune.get_context().get_trial_id()
    # Train propagates this to its controller: on a busy machine starting the worker processes can
    # outlast Train's 60 s default, and each timeout restarts the whole group from scratch.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(base["tune"].get("worker_start_timeout_s", 600)))
    plain = apply_trial_config(base, config, groups)
    plain["out"] = join(base["out"], TRIALS_DIR, trial_id)
    train(plain, callbacks=[TuneReportCallback()])


# ---------------------------------------------------------------------------------------------
# Results: DIR/results.csv (kept current while the search runs), DIR/best/, DIR/summary.json


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class TuningCallback(_tune_callback_base()):
    """Tune callback in the tuning driver: keeps DIR/results.csv current, logs trial starts/ends to
    DIR/trials.log, and frees the worker placement groups of trials that Tune stopped."""

    def __init__(self, out: str, metric: str, mode: str, keys: list[str]) -> None:
        self.out, self.metric, self.mode, self.keys = out, metric, mode, keys
        self._sweep_until = 0.0
        self._last_sweep = 0.0

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"start {trial.trial_id}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"end {trial.trial_id}")
        self._write(trials)
        self._sweep_until = time.monotonic() + ORPHAN_SWEEP_S

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._log(f"error {trial.trial_id}")
        self._write(trials)
        self._sweep_until = time.monotonic() + ORPHAN_SWEEP_S

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        # a stopped trial's actor takes a moment to die; sweep every 2 s for a while after each stop
        now = time.monotonic()
        if now < self._sweep_until and now - self._last_sweep >= 2.0:
            self._last_sweep = now
            release_orphaned_placement_groups()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._write(trials)
        release_orphaned_placement_groups()

    def _write(self, trials: list) -> None:
        events = read_trial_events(self.out)
        rows = [trial_row(self.out, t.trial_id, events.get(t.trial_id), str(t.status), t.config, self.metric,
                          self.keys) for t in trials]
        write_results(self.out, rows)

    def _log(self, event: str) -> None:
        url = join(self.out, TRIALS_LOG)
        previous = read_text(url) if exists(url) else ""
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_text(url, previous + f"{stamp} {event}\n")


def read_trial_events(out: str) -> dict[str, str]:
    """trial_id -> its last event in DIR/trials.log ("start", "end" or "error"); survives a resume."""
    url = join(out, TRIALS_LOG)
    events: dict[str, str] = {}
    for line in (read_text(url).splitlines() if exists(url) else []):
        parts = line.split()
        if len(parts) == 3:
            events[parts[2]] = parts[1]
    return events


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When Tune stops a trial (ASHA, time budget, Ctrl-C) it ends the trial's actor, and with it the
    Train controller; the worker placement group it created would stay reserved until this job ends
    (Ray frees a non-detached group only once both its creator and its job are dead). Train's own
    PlacementGroupCleaner asks the State API, which needs the dashboard and a single Ray instance per
    machine; this reads the GCS placement-group table directly (creator_actor_dead).
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    from dermaid.ray_compat import placement_group_table

    job_id = ray.get_runtime_context().get_job_id()
    removed = 0
    try:
        table = placement_group_table()
    except Exception:  # a private API: never let bookkeeping break a search
        return 0
    for data in table:
        creator_is_actor = bool(data.creator_actor_id.strip(b"\x00")) and bool(data.creator_actor_id.strip(b"\xff"))
        if (data.state == gcs_pb2.PlacementGroupTableData.REMOVED or data.is_detached or not creator_is_actor
                or not data.creator_actor_dead or data.creator_job_id.hex() != job_id):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
            removed += 1
        except Exception:
            pass
    return removed


def trial_row(out: str, trial_id: str, event: str | None, tune_status: str, config: dict[str, Any], metric: str,
              keys: list[str]) -> dict[str, Any]:
    """One results-table row: status, epochs run, the best epoch's metrics (history.csv) and the sampled values."""
    from dermaid.training.history import read_history

    run_dir = join(out, TRIALS_DIR, trial_id)
    history = read_history(run_dir)
    row: dict[str, Any] = {"trial_id": trial_id, "status": _status(run_dir, event, tune_status),
                           "epochs": int(history["epoch"].max()) if len(history) else 0}
    if len(history) and metric in history and history[metric].notna().any():
        best = history.loc[history[metric].astype(float).idxmax()]
        row.update({metric: float(best[metric]), "best_epoch": int(best["epoch"])})
        for extra in ("val/auc_macro", "val/loss"):
            if extra in history and extra != metric:
                row[extra] = float(best[extra])
        row["seconds"] = round(float(history["seconds"].sum()), 1) if "seconds" in history else math.nan
    else:
        row.update({metric: math.nan, "best_epoch": math.nan})
    for key in keys:
        value = config.get(key)
        row[CONFIG_PREFIX + key] = value.item() if hasattr(value, "item") else value
    row["run_dir"] = run_dir
    return row


def _status(run_dir: str, event: str | None, tune_status: str) -> str:
    """completed (its trainer finished), stopped (by ASHA or the time budget), error; else unfinished/pending.

    From DIR/trials.log, not Tune's status alone: Tune marks the trials it stops for a Ctrl-C TERMINATED
    in memory too, although its saved state resumes them.
    """
    if event == "error" or tune_status == "ERROR":
        return "error"
    if event == "end":
        # train() writes summary.json when its trainer finishes; a trial Tune stopped never gets there
        return "completed" if exists(join(run_dir, "summary.json")) else "stopped"
    return "pending" if tune_status == "PENDING" and event is None else "unfinished"


def write_results(out: str, rows: list[dict[str, Any]]) -> str:
    """DIR/results.csv, trials in creation order."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n", float_format="%.6g")
    url = join(out, RESULTS_FILE)
    write_text(url, buf.getvalue())
    return url


def format_results(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> str:
    """The results table as text, best trial first."""
    import pandas as pd

    frame = pd.DataFrame(rows).drop(columns=["run_dir"], errors="ignore")
    frame = frame.rename(columns={c: c[len(CONFIG_PREFIX):] for c in frame.columns if c.startswith(CONFIG_PREFIX)})
    frame = frame.sort_values(metric, ascending=(mode == "min"), na_position="last")
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _finish(out: str, base: dict[str, Any], keys: list[str], wall_seconds: float) -> dict[str, Any]:
    """Print the results table (TuningCallback wrote it at the experiment's end); copy the best trial to DIR/best."""
    import pandas as pd

    from dermaid.evaluation.metrics import json_safe
    from dermaid.models.card import CARD_FILE, load_card

    tune_cfg = base["tune"]
    metric, mode = tune_cfg["metric"], tune_cfg["mode"]
    url = join(out, RESULTS_FILE)
    rows = pd.read_csv(io.StringIO(read_text(url))).to_dict("records") if exists(url) else []
    finished = sum(r["status"] in ("completed", "stopped", "error") for r in rows)
    interrupted = finished < len(rows) or (len(rows) < int(tune_cfg["num_samples"])
                                           and not _budget_spent(tune_cfg, wall_seconds))
    print(f"\n{len(rows)} trials ({finished} finished) -> {url}")
    if rows:
        print(format_results(rows, metric, mode))

    candidates = [r for r in rows if r["status"] in ("completed", "stopped") and not pd.isna(r.get(metric))
                  and exists(join(r["run_dir"], "best", CARD_FILE))]
    summary: dict[str, Any] = {"out": out, "search": base["hparams_search"].get("name"), "num_trials": len(rows),
                               "finished": finished, "interrupted": bool(interrupted), "metric": metric,
                               "mode": mode, "wall_seconds": round(wall_seconds, 1), "best": None}
    if not candidates:
        errors = [r["trial_id"] for r in rows if r["status"] == "error"]
        write_text(join(out, "summary.json"), json.dumps(json_safe(summary), indent=2))
        if not interrupted:
            raise DermaidError(f"no trial reported {metric}" + (f"; trials {errors} failed (their errors are in "
                                                              f"{join(out, TUNE_DIR_NAME)})" if errors else ""))
        return summary
    better = max if mode == "max" else min
    worse = min if mode == "max" else max
    best = better(candidates, key=lambda r: r[metric])
    worst = worse(candidates, key=lambda r: r[metric])
    best_url = copy_checkpoint(join(best["run_dir"], "best"), join(out, "best"))
    card = load_card(best_url)
    overrides = " ".join(f"{k[len(CONFIG_PREFIX):]}={v}" for k, v in best.items() if k.startswith(CONFIG_PREFIX))
    summary["best"] = {"trial_id": best["trial_id"], metric: best[metric], "epoch": card.get("epoch"),
                       "checkpoint": best_url, "trial_dir": best["run_dir"], "overrides": overrides}
    summary["worst"] = {"trial_id": worst["trial_id"], metric: worst[metric]}
    write_text(join(out, "summary.json"), json.dumps(json_safe(summary), indent=2, default=str))
    print(f"\nbest trial {best['trial_id']}: {metric} {best[metric]:.4f} (worst {worst[metric]:.4f})  {overrides}")
    print(f"best checkpoint: {best_url}   (dermaid evaluate checkpoint={best_url} ...)")
    print(DISCLAIMER)
    return summary


def _budget_spent(tune_cfg: dict[str, Any], wall_seconds: float) -> bool:
    budget = tune_cfg.get("time_budget_s")
    return bool(budget) and wall_seconds >= float(budget) * 0.95


def copy_checkpoint(src: str, dst: str) -> str:
    """Copy a checkpoint directory (card + artifact) atomically to dst."""
    from dermaid.models.card import CARD_FILE, load_card

    card = load_card(src)
    with atomic_dir(dst) as tmp:
        write_bytes(join(tmp, card["artifact"]), read_bytes(join(src, card["artifact"])))
        write_bytes(join(tmp, CARD_FILE), read_bytes(join(src, CARD_FILE)))
    return dst
