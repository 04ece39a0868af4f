"""One function per `dermaid` command, for notebooks and scripts: the command line's config, the command line's code.

    from dermaid import api
    data = api.prepare("experiment=toy")                      # PrepareResult: version, version_url, counts
    run = api.train("experiment=toy", "train.epochs=3", optim__lr=3e-4)
    run.run_dir, run.checkpoint, run.metrics["val/balanced_accuracy"], run.dataset_version
    api.evaluate(checkpoint=run.checkpoint, experiment="toy", split="test").metrics["balanced_accuracy"]
    api.calibrate(checkpoint=run.checkpoint, experiment="toy")
    api.tune("hparams_search=toy", tune__num_samples=2)       # TuneResult: best trial, its checkpoint
    api.report("train-report", run_dir=run.run_dir).html      # ReportResult: folder, html, key figures
    api.runs(root="runs", baseline="toy")                     # the runs table (dermaid.runs), a DataFrame
    api.config("train", "experiment=toy")                     # the composed config (`dermaid train --cfg job`)

Each function composes conf/<command>.yaml with Hydra's compose API (dermaid.config.compose) from the
overrides the command line takes: strings as typed after `dermaid <command>`, or keyword arguments
(`optim__lr=3e-4` or `**{"optim.lr": 3e-4}` is `optim.lr=0.0003`; lists, dicts, None and booleans are
written in Hydra's override grammar). A command's shorthand works as on the command line
(`api.report("eda", samples_per_class=2)`, `api.reviewers("list")`). Then it calls the very function
`dermaid <command>` calls (dermaid.cli.COMMANDS), which prints the same lines, and wraps what that
function returns in a small typed result (`.raw` keeps the whole return value). Commands without a
typed result here (synth, distill, quantize, export, download, db, ...; and any added to COMMANDS later,
such as `api.cv`) return a CommandResult. Mistakes raise DermaidError with the command line's message.

Ray: a command that needs Ray joins the one this process already runs, so `ray.init(address="ray://head:10001")`
in a notebook cell (or RAY_ADDRESS in the environment, or the `ray.address=` override) sends the work to a
cluster; otherwise it starts a private local Ray, as the command line does.

Feedback while a call runs: training prints one line per epoch (from the workers), a search Tune's trial table,
prepare one line per ~10% of the images (the `dermaid` logger's INFO lines, shown here on stdout as Hydra's
logging shows them on the command line). DermAID gives decision support for research, never a diagnosis.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dermaid.errors import DermaidError

_PLAIN_STRING = re.compile(r"^[\w./:@%+~-]+$")  # what Hydra's override grammar reads unquoted (and as a string)
_NUMBER_LIKE = re.compile(r"^[+-]?(\d|\.\d|inf|nan)", re.IGNORECASE)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CommandResult:
    """What a command returned, for the commands without a typed result of their own."""

    command: str
    out: str | None
    raw: Any = field(repr=False)


@dataclass(frozen=True)
class PrepareResult:
    """`dermaid prepare`: the content-addressed dataset version."""

    version: str
    version_url: str
    num_images: int
    counts: dict[str, Any]
    tags: list[str]
    raw: dict[str, Any] = field(repr=False)  # the manifest


@dataclass(frozen=True)
class TrainResult:
    """`dermaid train`: the run directory, its best checkpoint and that epoch's validation metrics."""

    run_dir: str
    checkpoint: str
    metrics: dict[str, float]
    dataset_version: str
    best_epoch: int | None
    wall_seconds: float
    raw: dict[str, Any] = field(repr=False)  # DIR/summary.json


@dataclass(frozen=True)
class TuneResult:
    """`dermaid tune`: the search directory, the best trial (its checkpoint copied to DIR/best) and its metric."""

    run_dir: str
    checkpoint: str | None
    metrics: dict[str, float]
    dataset_version: str | None
    best_trial: str | None
    overrides: str | None  # the best trial's values as `dermaid train` overrides
    num_trials: int
    finished: int
    raw: dict[str, Any] = field(repr=False)  # DIR/summary.json


@dataclass(frozen=True)
class EvaluateResult:
    """`dermaid evaluate`: predictions.csv and metrics.json of one checkpoint on one split."""

    out: str
    predictions: str
    split: str
    num_images: int
    metrics: dict[str, Any]  # the scalar metrics of metrics.json (balanced_accuracy, auc_macro, ...)
    dataset_version: str
    checkpoint: str
    raw: dict[str, Any] = field(repr=False)  # metrics.json in full (per_class, calibration, ood, triage)


@dataclass(frozen=True)
class CalibrateResult:
    """`dermaid calibrate`: the OOD detector, abstention threshold and triage cut-off stored with the checkpoint."""

    checkpoint: str
    ood_method: str
    ood_threshold: float
    triage_cutoff: float
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ReportResult:
    """`dermaid report NAME`: the report folder (report.ipynb, report.html, key_figures.json)."""

    out: str
    html: str
    notebook: str
    key_figures: dict[str, Any]


# --------------------------------------------------------------------------- composing a command's config


def overrides_from(args: tuple[str, ...] | list[str] = (), kwargs: dict[str, Any] | None = None) -> list[str]:
    """The command-line arguments for positional strings and keyword values (`optim__lr=3e-4` -> `optim.lr=0.0003`)."""
    argv = [str(a) for a in args]
    for key, value in (kwargs or {}).items():
        argv.append(f"{key.replace('__', '.')}={format_value(value)}")
    return argv


def format_value(value: Any) -> str:
    """A Python value in Hydra's override grammar: null, true/false, numbers, quoted strings, [lists], {dicts}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        plain = _PLAIN_STRING.match(value) and not _NUMBER_LIKE.match(value) and value.lower() not in (
            "null", "true", "false")
        return value if plain else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise DermaidError(f"cannot write {value!r} ({type(value).__name__}) as a command-line value")


def _command(name: str) -> tuple[Any, Any]:
    """(module, function) of `dermaid <name>`: the entry of dermaid.cli.COMMANDS, the very function the CLI calls."""
    from dermaid.cli import COMMANDS
    from dermaid.config import conf_dir

    if name not in COMMANDS:
        raise DermaidError(f"unknown command {name!r}; one of {sorted(COMMANDS)}")
    if not (conf_dir() / f"{name}.yaml").exists():
        raise DermaidError(f"command {name!r} is not available yet (no conf/{name}.yaml)")
    module_name, func_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, func_name)


def config(command: str, *args: str, **kwargs: Any) -> DictConfig:
    """conf/<command>.yaml composed with the overrides, as `dermaid <command> ... --cfg job` shows it; every
    required (`???`) key checked as the command line checks it."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dermaid.cli import _missing_keys, _required_message
    from dermaid.config import compose

    module, _ = _command(command)
    argv = overrides_from(args, kwargs)
    if hasattr(module, "hydra_args"):  # the command's shorthand (`report eda k=v`, `db upgrade`), as in dermaid.cli
        argv = module.hydra_args(argv)
    try:
        cfg = compose(command, argv)
    except (HydraException, OmegaConfBaseException) as exc:  # a bad override: its message's own lines, as one
        lines = [line.strip() for line in str(exc).strip().splitlines() if line and not line[0].isspace()]
        raise DermaidError(f"{command}: {' '.join(lines)}") from None
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))
    if missing:
        raise DermaidError(_required_message(command, missing[0]))
    return cfg


def call(command: str, *args: str, **kwargs: Any) -> Any:
    """Compose `command`'s config and run the CLI's function on it; returns what that function returns."""
    from omegaconf.errors import MissingMandatoryValue

    from dermaid.cli import _required_message

    cfg = config(command, *args, **kwargs)
    _, fn = _command(command)
    with _progress_lines():
        try:
            return fn(cfg)
        except MissingMandatoryValue as exc:  # a `???` reached through an interpolation
            raise DermaidError(_required_message(command, str(exc.full_key))) from None
        except SystemExit as exc:  # `dermaid tune` exits 130 after a Ctrl-C (it printed how to resume)
            if exc.code == 130:
                raise KeyboardInterrupt(f"{command} interrupted") from None
            raise


@contextlib.contextmanager
def _progress_lines() -> Iterator[None]:
    """The `dermaid` loggers' INFO lines (prepare's progress ...) on stdout while a command runs, as Hydra's
    logging shows them on the command line; nothing is added when the application configured logging itself."""
    package = logging.getLogger("dermaid")
    if _shown_on_console(package):
        yield
        return
    handler = logging.StreamHandler(sys.stdout)  # the stream of the running cell
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def _shown_on_console(logger: logging.Logger) -> bool:
    """Whether `logger`'s INFO records already reach a console stream (Hydra's logging, a basicConfig)."""
    if logger.getEffectiveLevel() > logging.INFO:
        return False
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if (isinstance(handler, logging.StreamHandler) and handler.level <= logging.INFO
                    and getattr(handler, "stream", None) in consoles):
                return True
        current = current.parent if current.propagate else None
    return False


# --------------------------------------------------------------------------- one function per command


def prepare(*args: str, **kwargs: Any) -> PrepareResult:
    """`dermaid prepare ...`: decode, resize and shard a raw dataset into a version."""
    from dermaid.files import absolute_url, join

    manifest = call("prepare", *args, **kwargs)
    cfg_out = config("prepare", *args, **kwargs).out  # where `dermaid prepare` wrote (its manifest does not say)
    return PrepareResult(version=manifest["version"], version_url=join(absolute_url(str(cfg_out)), manifest["version"]),
                         num_images=int(manifest["num_records"]), counts=manifest["counts"],
                         tags=list(manifest.get("tags") or []), raw=manifest)


def train(*args: str, **kwargs: Any) -> TrainResult:
    """`dermaid train ...`: a Ray Train run (scaling.num_workers=0: in this process, no cluster)."""
    summary = call("train", *args, **kwargs)
    return TrainResult(run_dir=summary["out"], checkpoint=summary["best_checkpoint"],
                       metrics=dict(summary["best_metrics"]), dataset_version=summary["dataset_version"],
                       best_epoch=summary["best_epoch"], wall_seconds=float(summary["wall_seconds"]), raw=summary)


def tune(*args: str, **kwargs: Any) -> TuneResult:
    """`dermaid tune hparams_search=NAME ...`: a Ray Tune search whose trials are `dermaid train` runs."""
    from omegaconf import OmegaConf

    from dermaid.files import exists, join, read_text
    from dermaid.tuning.layout import BASE_CONFIG_FILE

    summary = call("tune", *args, **kwargs)
    best = summary.get("best") or {}
    metric = summary["metric"]
    base_url = join(summary["out"], BASE_CONFIG_FILE)
    version = None
    if exists(base_url):
        version = (OmegaConf.create(read_text(base_url)).get("data") or {}).get("version")
    return TuneResult(run_dir=summary["out"], checkpoint=best.get("checkpoint"),
                      metrics={metric: best[metric]} if metric in best else {}, dataset_version=version,
                      best_trial=best.get("trial_id"), overrides=best.get("overrides"),
                      num_trials=int(summary["num_trials"]), finished=int(summary["finished"]), raw=summary)


def evaluate(*args: str, **kwargs: Any) -> EvaluateResult:
    """`dermaid evaluate checkpoint=DIR ...`: predictions.csv + metrics.json."""
    from dermaid.evaluation.evaluate import PREDICTIONS_FILE
    from dermaid.files import join

    result = call("evaluate", *args, **kwargs)
    metrics = result["metrics"]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return EvaluateResult(out=result["out"], predictions=join(result["out"], PREDICTIONS_FILE), split=result["split"],
                          num_images=int(result["num_images"]), metrics=scalars,
                          dataset_version=str(metrics.get("dataset_version")), checkpoint=str(metrics.get("checkpoint")),
                          raw=metrics)


def calibrate(*args: str, **kwargs: Any) -> CalibrateResult:
    """`dermaid calibrate checkpoint=DIR ...`: OOD detectors, abstention threshold, triage cut-off into the card."""
    result = call("calibrate", *args, **kwargs)
    return CalibrateResult(checkpoint=str(result["checkpoint"]), ood_method=str(result["ood"]["method"]),
                           ood_threshold=float(result["ood"]["threshold"]),
                           triage_cutoff=float(result["triage"]["cutoff"]), raw=result)


def report(name: str, *args: str, **kwargs: Any) -> ReportResult:
    """`dermaid report NAME key=value ...`: execute a notebook report; keyword arguments set its parameters."""
    import json

    from dermaid.files import join, read_text
    from dermaid.reporting.runner import FIGURES_FILE, HTML_FILE, NOTEBOOK_FILE

    folder = call("report", name, *args, **kwargs)
    return ReportResult(out=folder, html=join(folder, HTML_FILE), notebook=join(folder, NOTEBOOK_FILE),
                        key_figures=json.loads(read_text(join(folder, FIGURES_FILE)) or "{}"))


def runs(*args: str, **kwargs: Any):
    """`dermaid runs root=... [baseline=NAME] [wandb=entity/project]`: the runs table (dermaid.runs) as a DataFrame,
    without the text copy `dermaid runs` prints (the notebook shows the DataFrame itself)."""
    from dermaid.runs import table_from_config

    return table_from_config(config("runs", *args, **kwargs))


def _generic(name: str):
    def command(*args: str, **kwargs: Any) -> CommandResult:
        raw = call(name, *args, **kwargs)
        out = raw.get("out") if isinstance(raw, dict) else (raw if isinstance(raw, str) else None)
        return CommandResult(command=name, out=None if out is None else str(out), raw=raw)

    command.__name__ = name.replace("-", "_")
    command.__doc__ = f"`dermaid {name} ...` (see `dermaid {name} --help`); returns a CommandResult."
    return command


synth = _generic("synth")
distill = _generic("distill")
quantize = _generic("quantize")
export = _generic("export")
pipeline = _generic("pipeline")


def __getattr__(name: str):
    """Every other command of dermaid.cli.COMMANDS (download, labels_export, db, cv ...) as a function."""
    from dermaid.cli import COMMANDS

    command = name.replace("_", "-")
    if command in COMMANDS:
        return _generic(command)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
