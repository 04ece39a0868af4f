"""The `dermaid` command: one sub-command per Hydra app, each with its own primary config in conf/.

    dermaid --help
    dermaid synth out=data/toy n=600 seed=0
    dermaid prepare data=isic2019 data.root=data/toy out=data/prepared
    dermaid train experiment=toy
    dermaid <cmd> --help | --cfg job | key=value ...

A DermaidError (bad input the user can fix) and a required `???` key left unset (`dermaid serve` without
`checkpoint=`) are printed as one line and exit with status 2; Ctrl-C before a command has finished is one
line too, status 130.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable

# name -> (module, function, one-line help). The primary config is conf/<name>.yaml.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("dermaid.data.synth", "run", "generate a toy dataset in the ISIC 2019 layout (kind=ood: non-lesion photos)"),
    "download": ("dermaid.data.download", "run", "download the official ISIC 2019 archives"),
    "prepare": ("dermaid.data.prepare", "run", "decode, resize and shard a dataset into a version"),
    "train": ("dermaid.training.driver", "run", "train a classifier on Ray Train"),
    "evaluate": ("dermaid.evaluation.evaluate", "run", "predictions.csv + metrics.json for a checkpoint"),
    "predict": ("dermaid.inference.batch", "run", "predict one image (printed) or a folder/bucket on Ray Data (CSV)"),
    "calibrate": ("dermaid.evaluation.calibrate", "run", "fit OOD detectors and the triage cut-off for a checkpoint"),
    "tune": ("dermaid.tuning", "run", "hyperparameter search with Ray Tune"),
    "cv": ("dermaid.training.cv", "run", "K-fold cross-validation: every fold on Ray Train, OOF metrics, fold ensemble"),
    "ensemble": ("dermaid.models.ensemble", "run", "combine checkpoints into one ensemble checkpoint"),
    "distill": ("dermaid.compress", "run_distill", "knowledge distillation into a smaller student"),
    "quantize": ("dermaid.compress", "run_quantize", "int8 post-training quantization"),
    "export": ("dermaid.compress", "run_export", "export a checkpoint to ONNX or TorchScript"),
    "serve": ("serve.launcher", "run", "serve a checkpoint over HTTP with Ray Serve"),
    "labels-export": ("dermaid.uploads.export", "run", "write reviewed uploads as an ISIC dataset"),
    "db": ("dermaid.uploads.schema", "run", "upgrade | current | history of the uploads database's schema"),
    "reviewers": ("dermaid.uploads.reviewers", "run", "add NAME | revoke NAME | list dermatologist tokens"),
    "uploads": ("dermaid.uploads.purge", "run", "purge: delete unreviewed uploads older than storage.retention_days"),
    "report": ("dermaid.reporting.runner", "run", "execute a notebook report with papermill"),
    "monitor": ("dermaid.monitoring.simulate", "run", "simulate: replay toy uploads (optionally shifted) through a running service"),
    "runs": ("dermaid.runs", "run", "table of runs, tuning trials, CV and registered models, with config differences"),
    "pipeline": ("dermaid.pipeline", "run", "prepare -> train -> evaluate -> reports -> register"),
    "registry": ("dermaid.registry.cli", "run", "list | show NAME | promote NAME@VERSION | rollback NAME model versions"),
    "gc": ("dermaid.registry.gc", "run", "name and remove what crashed publishes left (dry_run=true: name only)"),
}


def _usage() -> str:
    from dermaid.config import conf_dir

    lines = ["usage: dermaid <command> [key=value ...] [--help | --cfg job]", "", "commands:"]
    for name, (_, _, text) in COMMANDS.items():
        available = (conf_dir() / f"{name}.yaml").exists()
        lines.append(f"  {name:<14} {text}" + ("" if available else "  (not available yet)"))
    lines += ["", "DermAID gives decision support for research; it does not diagnose."]
    return "\n".join(lines)


def _exit_after_interrupt(status: int) -> None:
    """Stop the Ray this command started (its daemons got the terminal's Ctrl-C too) and exit at once:
    Ray's own exit hooks can crash on a half-stopped cluster (SIGSEGV), which is no way to say goodbye."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except BaseException:  # noqa: BLE001 - best effort; the exit below is what matters
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _fail(message: str) -> None:
    """The one-line answer to a mistake the user can fix: `error: ...` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _required_message(command: str, key: str) -> str:
    """`checkpoint= is required (a checkpoint directory ...)`: the why is the key's comment in conf/<command>.yaml."""
    from dermaid.config import conf_dir

    leaf = key.rsplit(".", 1)[-1]
    primary = conf_dir() / f"{command}.yaml"
    text = primary.read_text() if primary.exists() else ""
    found = re.search(rf"^\s*{re.escape(leaf)}:\s*\?\?\?\s*#\s*(?:required:\s*)?(.+)$", text, re.MULTILINE)
    why = found.group(1).strip() if found else f"see `dermaid {command} --help`"
    return f"{key}= is required ({why})"


def _guarded(fn: Callable, command: str) -> Callable:
    """Run a command on its composed config: every `???` key checked first (one rule for all commands),
    user errors and Ctrl-C as one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from dermaid.errors import DermaidError

    def wrapper(cfg):
        missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))
        if missing:
            _fail(_required_message(command, missing[0]))
        try:
            return fn(cfg)
        except DermaidError as exc:
            _fail(str(exc))
        except MissingMandatoryValue as exc:  # a `???` reached through an interpolation
            _fail(_required_message(command, str(exc.full_key)))
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            _exit_after_interrupt(130)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__module__ = f"dermaid.cli.{command}"  # Hydra names the job (outputs/<job>/...) after the command
    return wrapper


def _missing_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???`, found without resolving interpolations (`out: ${checkpoint}-int8`
    would otherwise fail on the missing key it points at, with Hydra's traceback instead of our line)."""
    if isinstance(node, dict):
        found = [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    elif isinstance(node, list):
        found = [k for i, value in enumerate(node) for k in _missing_keys(value, f"{prefix}{i}.")]
    else:
        found = [prefix[:-1]] if node == "???" else []
    return sorted(found)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _fail(f"unknown command {name!r}\n\n{_usage()}")
    import hydra

    from dermaid.config import conf_dir

    module_name, func_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    fn = getattr(module, func_name)
    # A command module may accept shorthand (`dermaid report eda k=v`): its optional
    # `hydra_args(argv) -> argv` rewrites the arguments into Hydra overrides.
    if hasattr(module, "hydra_args"):
        from dermaid.errors import DermaidError

        try:
            rest = module.hydra_args(rest)
        except DermaidError as exc:
            _fail(str(exc))
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=name)(_guarded(fn, name))
    sys.argv = [f"dermaid {name}", *rest]
    app()


if __name__ == "__main__":
    main()
