"""The runs table: every training run, tuning search and trial, cross-validation, evaluation and registered model
under a root, one row each, with the figures that compare them and the config differences from a baseline run.

    dermaid runs                                     # runs/ (paths.runs_dir) and registry/ (registry=)
    dermaid runs root=gs://bucket/runs baseline=toy out=runs.csv
    dermaid runs wandb=entity/project                # W&B's runs too when a key is set; offline it says so

    from dermaid import api
    table = api.runs(root="runs", baseline="toy")    # the same table (a DataFrame, newest first)
    from dermaid.runs import runs_table              # without composing a config

What is read where (any fsspec URL, read only):
    train       DIR/config.yaml, DIR/best/card.json, DIR/summary.json: `dermaid train`
    tune        DIR/tune_config.yaml, summary.json, best/card.json: `dermaid tune`; DIR/trials/<id>/ are `trial` rows
    cv          a folder holding a cross-validation summary (CV_MARKERS: cv_summary.json, oof_metrics.json, ...):
                `dermaid cv`; the train runs inside it are `cv-fold` rows
    evaluation  DIR/metrics.json + DIR/predictions.csv: `dermaid evaluate` (test-split figures of a checkpoint)
    registered  a model registry's versions (dermaid.registry.Registry when installed; else the
                <name>/<version>/registry.json entries `dermaid pipeline` writes)
A folder that looks like one of these but cannot be read is a row whose `problem` says why; the rest load.

Columns (COLUMNS): kind, name (path under the root), date (the checkpoint card's `created`), model, image_size,
dataset_version, balanced_accuracy, auc_macro, ece (before temperature scaling) and ece_calibrated (after: the
probabilities users get; validation fold for runs, the evaluated split for evaluations and registered models),
the abstention figures of a calibrated checkpoint (ood_method, ood_auroc, refused_share: validation lesions
refused, triage_cutoff, triage_sensitivity), config_diff (what differs from the baseline run's config), problem,
parent, path, checkpoint. Figures are for research comparison, not clinical performance claims.
"""

from __future__ import annotations

import io
import json
import math
import netrc
import os
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, get_fs, join, read_text, write_text

COLUMNS = ("kind", "name", "date", "model", "image_size", "dataset_version", "balanced_accuracy", "auc_macro", "ece",
           "ece_calibrated", "ood_method", "ood_auroc", "refused_share", "triage_cutoff", "triage_sensitivity",
           "config_diff", "problem", "parent", "path", "checkpoint")
SHOWN = ("kind", "name", "date", "model", "image_size", "dataset_version", "balanced_accuracy", "auc_macro",
         "ece_calibrated", "refused_share", "triage_sensitivity", "config_diff")  # what `dermaid runs` prints
# a file of one of these names marks a cross-validation folder (`dermaid cv`: cv_config.yaml, oof_metrics.json,
# cv_summary.csv, oof_predictions.csv ...); its figures: the first of CV_SUMMARY_ORDER present
CV_MARKERS = re.compile(r"^(cv([_-](summary|results|metrics|config))?|oof([_-][\w-]+)?)\.(json|csv|yaml)$")
CV_SUMMARY_ORDER = ("oof_metrics.json", "cv_summary.json", "cv.json", "cv_metrics.json", "cv_results.json")
CV_CONFIG = "cv_config.yaml"  # the resolved base config of every fold (dermaid.training.cv.CV_CONFIG_FILE)
CV_SKIP_DIRS = {"tune", "ensemble"}  # inside a CV folder: Ray Tune's state, the fold ensemble's checkpoint
# never descended into: checkpoints, Ray's and W&B's own state, dataset shards, caches
SKIP_DIRS = {"best", "last", "ray", "wandb", "shards", "tags", "__pycache__", "node_modules", "model", "trials"}
# keys left out of config differences: where things are written or logged, not what was trained
DIFF_IGNORED = ("out", "paths", "ray", "logger", "hydra", "pipeline", "registry", "demo", "dataset_version",
                "data.prepared_dir", "data.root", "data.version", "data.tag", "train.fail_at_epoch",
                "train.loader_workers", "train.torch_threads", "run.log_level", "resume")
MAX_DEPTH = 6  # folder levels searched below the root (runs/tune/NAME/trials/ID is 4)
WANDB_TIMEOUT_S = 20


# --------------------------------------------------------------------------- command


def run(cfg: DictConfig) -> pd.DataFrame:
    """`dermaid runs [root=URL] [baseline=NAME] [wandb=entity/project] [out=FILE.csv]`: print the runs table."""
    table = table_from_config(cfg)
    print(format_table(table))
    if cfg.out:
        print(f"-> {cfg.out}")
    return table


def table_from_config(cfg: DictConfig) -> pd.DataFrame:
    """The table of a composed `runs` config (what `dermaid runs` prints and `dermaid.api.runs` returns);
    written as CSV to `out` when set."""
    table = runs_table(str(cfg.root), baseline=cfg.baseline or None, wandb=cfg.wandb or None,
                       registry=cfg.registry or None)
    if cfg.out:
        buf = io.StringIO()
        table.to_csv(buf, index=False, lineterminator="\n")
        write_text(absolute_url(str(cfg.out)), buf.getvalue())
    return table


def format_table(table: pd.DataFrame) -> str:
    """The table as text: SHOWN columns, then one line per folder with a problem."""
    lines = []
    good = table[table["problem"].isna()] if len(table) else table
    if len(good):
        frame = good[[c for c in SHOWN if c in good]].copy()
        frame["date"] = frame["date"].map(lambda d: "" if pd.isna(d) else d.strftime("%Y-%m-%d %H:%M"))
        for column in frame.columns[frame.dtypes == float]:
            frame[column] = frame[column].map(lambda v: f"{v:.4f}")
        frame = frame.astype(object).where(frame.notna() & (frame != "nan"), "")
        lines.append(frame.to_string(index=False))
    else:
        lines.append(f"no runs under {table.attrs.get('root', 'the root')}")
    broken = table[table["problem"].notna()] if len(table) else table
    for _, row in broken.iterrows():
        lines.append(f"{row['kind']} {row['name']}: {row['problem']}")
    if table.attrs.get("baseline"):
        lines.append(f"config_diff: against {table.attrs['baseline']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the table


def runs_table(root: str = "runs", baseline: str | None = None, wandb: str | None = None,
               registry: str | None = None) -> pd.DataFrame:
    """Every run under `root` (and `registry`, and W&B's `entity/project` when a key is set), newest first.

    baseline: a name (as in the `name` column) or path of a run whose config the others are compared with;
    None: the oldest readable run. `table.attrs`: root, baseline, notes (what was skipped and why), configs
    (name -> flattened config)."""
    root_url = absolute_url(root)
    if not exists(root_url):
        raise DermaidError(f"root={root}: no such folder")
    rows: list[dict[str, Any]] = []
    configs: dict[str, dict[str, Any]] = {}
    found = [(row, config) for kind, url, parent in discover(root_url) for row, config in (
        registry_rows(url, _name(root_url, url)) if kind == "registry"
        else [read_entry(kind, url, _name(root_url, url), parent and _name(root_url, parent))])]
    if registry and exists(absolute_url(registry)):
        registry_url = absolute_url(registry)
        inside = (registry_url + "/").startswith(root_url.rstrip("/") + "/")
        found += [] if inside else registry_rows(registry_url)
    notes: list[str] = []
    for row, config in found:
        rows.append(row)
        if config is not None:
            configs[row["name"]] = config
    if wandb:
        wandb_found, note = wandb_rows(wandb)
        rows += wandb_found
        notes.append(note)
        print(note)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["date"] = pd.to_datetime(table["date"], utc=True, errors="coerce", format="ISO8601")
    table["image_size"] = pd.to_numeric(table["image_size"], errors="coerce").astype("Int64")
    for column in ("balanced_accuracy", "auc_macro", "ece", "ece_calibrated", "ood_auroc", "refused_share",
                   "triage_cutoff", "triage_sensitivity"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    table = table.sort_values("date", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    table.attrs["root"] = root_url
    base = _baseline(table, configs, baseline)
    if base is not None:
        table["config_diff"] = [
            "(baseline)" if name == base else (format_differences(config_differences(configs[base], configs[name]))
                                               if name in configs else None)
            for name in table["name"]]
    table.attrs.update({"root": root_url, "baseline": base, "notes": notes, "configs": configs})
    return table


def discover(root: str, max_depth: int = MAX_DEPTH) -> list[tuple[str, str, str | None]]:
    """(kind, folder URL, parent folder URL or None) of every run-like folder under root, in walk order."""
    fs, root_path = get_fs(root)
    protocol = root.split("://", 1)[0] + "://" if "://" in root else ""
    found: list[tuple[str, str, str | None]] = []

    def url_of(path: str) -> str:
        return f"{protocol}{path}" if protocol and "://" not in path else path

    def visit(path: str, depth: int, parent: str | None) -> None:
        try:
            entries = fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        children = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        files = {name for name, e in children.items() if e["type"] != "directory"}
        dirs = {name: str(e["name"]).rstrip("/") for name, e in children.items() if e["type"] == "directory"}
        kind = _kind(files, set(dirs))
        url = url_of(path.rstrip("/"))
        if kind == "data":
            return  # a prepared dataset version
        if kind == "registry":
            found.append((kind, url_of(path.rstrip("/")), parent))
            return  # its versions: registry_rows
        if kind == "train" and parent and _is_cv(found, parent):
            kind = "cv-fold"
        if kind is not None:
            found.append((kind, url, parent))
        if kind == "cv-fold":
            return  # its oof/ and test/ evaluations are the CV's figures
        if kind == "tune":
            for name, child in sorted(dirs.get("trials") and _subdirs(fs, dirs["trials"]) or []):
                found.append(("trial", url_of(child), url))
            return
        if depth >= max_depth:
            return
        skipped = SKIP_DIRS | (CV_SKIP_DIRS if kind == "cv" else set())
        for name in sorted(dirs):
            if name in skipped or name.startswith(".") or ".tmp-" in name or ".old-" in name:
                continue
            visit(dirs[name], depth + 1, url if kind in ("train", "cv") else parent)

    visit(root_path, 0, None)
    return found


def _subdirs(fs, path: str) -> list[tuple[str, str]]:
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(str(e["name"]).rstrip("/").rsplit("/", 1)[-1], str(e["name"]).rstrip("/"))
            for e in entries if e["type"] == "directory"]


def _is_cv(found: list[tuple[str, str, str | None]], parent: str) -> bool:
    return any(kind == "cv" and url == parent for kind, url, _ in found)


def _kind(files: set[str], dirs: set[str]) -> str | None:
    """What a folder holds, from its file names alone."""
    if "manifest.json" in files and "shards" in dirs:
        return "data"
    if "tune_config.yaml" in files or ("results.csv" in files and "trials" in dirs):
        return "tune"
    if any(CV_MARKERS.match(name) for name in files):
        return "cv"
    if "registry.json" in files:  # a version of `dermaid pipeline`'s older layout, or a registry's root
        return "registered" if "model" in dirs else "registry"
    if files & {"config.yaml", "summary.json", "history.csv"} or {"best", "last"} & dirs:
        return "train"
    if {"metrics.json", "predictions.csv"} <= files:
        return "evaluation"
    return None


def _name(root: str, url: str) -> str:
    """A folder's name in the table: its path under the root (the root itself: its last part)."""
    prefix = root.rstrip("/") + "/"
    if url.rstrip("/") == root.rstrip("/"):
        return root.rstrip("/").rsplit("/", 1)[-1]
    return url[len(prefix):] if url.startswith(prefix) else url


# --------------------------------------------------------------------------- reading one folder


def read_entry(kind: str, url: str, name: str, parent: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(row, flattened config or None) of one folder; a folder that cannot be read gets its `problem`."""
    readers: dict[str, Callable] = {"train": _read_train, "trial": _read_train, "cv-fold": _read_train,
                                    "tune": _read_tune, "cv": _read_cv, "evaluation": _read_evaluation,
                                    "registered": _read_registered}
    row: dict[str, Any] = {key: None for key in COLUMNS}
    row.update(kind=kind, name=name, parent=parent, path=url)
    try:
        config = readers[kind](url, row)
    except Exception as exc:  # noqa: BLE001 - one unreadable folder is a row with its problem, never fatal
        row["problem"] = _describe(exc)
        return row, None
    return row, flatten(config) if config else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, DermaidError) else f"{type(exc).__name__}: {text}"


def _read_train(url: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """A `dermaid train` run directory (also a trial or a CV fold)."""
    config = _read_yaml(join(url, "config.yaml")) if exists(join(url, "config.yaml")) else None
    summary = _read_json(join(url, "summary.json")) if exists(join(url, "summary.json")) else {}
    checkpoint = join(url, "best")
    if not exists(join(checkpoint, "card.json")):
        row["model"] = ((config or {}).get("model") or {}).get("name")
        raise DermaidError("no best/card.json: training unfinished, or failed before its first epoch"
                           if config or summary else "no config.yaml, summary.json or best/card.json")
    card = _card_into_row(checkpoint, row)
    metrics = card.metrics or summary.get("best_metrics") or {}
    _metrics_into_row(row, {key[len("val/"):]: value for key, value in metrics.items() if key.startswith("val/")})
    row["dataset_version"] = card.dataset_version or summary.get("dataset_version")
    return config or dict(card.config)


def _read_tune(url: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """A `dermaid tune` search: its best trial's checkpoint (DIR/best) and metrics; config: the base + best values."""
    base = _read_yaml(join(url, "tune_config.yaml")) if exists(join(url, "tune_config.yaml")) else {}
    row["model"] = (base.get("model") or {}).get("name")
    row["dataset_version"] = (base.get("data") or {}).get("version")
    if not exists(join(url, "summary.json")):
        raise DermaidError("no summary.json: the search is running or was interrupted (resume=true continues it)")
    summary = _read_json(join(url, "summary.json"))
    best = summary.get("best")
    if not best:
        raise DermaidError(f"no finished trial reported {summary.get('metric')} ({summary.get('num_trials')} trials)")
    card = _card_into_row(join(url, "best"), row)
    _metrics_into_row(row, {key[len("val/"):]: value for key, value in card.metrics.items() if key.startswith("val/")})
    row["dataset_version"] = card.dataset_version or row["dataset_version"]
    config = flatten(base or dict(card.config))
    for item in str(best.get("overrides") or "").split():  # the best trial's sampled values
        key, _, value = item.partition("=")
        config = {k: v for k, v in config.items() if not k.startswith(key + ".")}
        config[key] = _parse_scalar(value)
    return config


def _read_cv(url: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """A cross-validation folder: its out-of-fold figures (oof_metrics.json of `dermaid cv`, else the first summary
    file of CV_SUMMARY_ORDER, keys found by name); config, model and dataset version from cv_config.yaml."""
    fs, path = get_fs(url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    config = _read_yaml(join(url, CV_CONFIG)) if CV_CONFIG in names else None
    row["model"] = ((config or {}).get("model") or {}).get("name")
    row["dataset_version"] = ((config or {}).get("data") or {}).get("version")
    source = next((n for n in CV_SUMMARY_ORDER if n in names), None)
    if source is None:
        raise DermaidError(f"no out-of-fold figures yet (none of {list(CV_SUMMARY_ORDER)}): the CV is running or "
                           "was interrupted (`dermaid cv` on the same out= continues it)")
    summary = _read_json(join(url, source))
    for column in ("balanced_accuracy", "auc_macro", "ece", "ece_calibrated"):
        row[column] = _find_number(summary, column)
    for column in ("model", "dataset_version"):
        value = row[column] or _find_value(summary, column)
        row[column] = value.get("name") if isinstance(value, dict) else value
    row["date"] = _find_value(summary, "created") or _modified(join(url, source))
    return config if config is not None else (summary.get("config") if isinstance(summary.get("config"), dict) else None)


def _read_evaluation(url: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """A `dermaid evaluate` output: metrics.json of one checkpoint on one split."""
    metrics = _read_json(join(url, "metrics.json"))
    _metrics_into_row(row, {**metrics, **(metrics.get("calibration") or {})})
    ood = metrics.get("ood") or {}
    triage = metrics.get("triage") or {}
    row.update(model=metrics.get("model"), dataset_version=metrics.get("dataset_version"),
               checkpoint=metrics.get("checkpoint"), date=_modified(join(url, "metrics.json")),
               ood_method=ood.get("method"), refused_share=ood.get("refused_in"),
               triage_sensitivity=triage.get("sensitivity"), triage_cutoff=triage.get("cutoff"))
    row["name"] = f"{row['name']} ({metrics.get('split')})"
    return None


def _read_registered(url: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """A registered model of `dermaid pipeline`'s layout: <version>/registry.json, model/ (checkpoint + card),
    metrics.json (its test-split evaluation)."""
    entry = _read_json(join(url, "registry.json"))
    checkpoint = str(entry.get("checkpoint") or join(url, "model"))
    return _registered_checkpoint(checkpoint, row, join(url, "metrics.json"))


def _registered_checkpoint(checkpoint: str, row: dict[str, Any], metrics_url: str | None,
                           metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    card = _card_into_row(checkpoint, row)
    if metrics_url and exists(metrics_url):
        metrics = _read_json(metrics_url)
    if metrics:  # the evaluation registered with it (test split)
        plain = {str(k).rsplit("/", 1)[-1] if str(k).startswith(("test/", "val/")) else k: v for k, v in metrics.items()}
        _metrics_into_row(row, {**plain, **(metrics.get("calibration") or {})})
    else:
        _metrics_into_row(row, {k[len("val/"):]: v for k, v in card.metrics.items() if k.startswith("val/")})
    row["dataset_version"] = card.dataset_version
    return dict(card.config)


def registry_rows(registry: str, prefix: str = "registry") -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """The versions of a model registry (dermaid.registry.Registry), each named `<prefix>/<model>@<version>`
    with the stages pointing at it; `dermaid pipeline`'s older <name>/<version>/registry.json entries too."""
    from dermaid.registry import Registry

    out = [read_entry(kind, url, f"{prefix}/{_name(registry, url)}", None)
           for kind, url, _ in discover(registry) if kind == "registered"]
    try:
        reg = Registry(registry)
        versions = []
        for model in reg.models():
            stages: dict[str, list[str]] = {}
            for stage in reg.stages(model):
                pointer = reg.stage(model, stage)
                if pointer is not None:
                    stages.setdefault(pointer.version, []).append(stage)
            versions += [(model, version, stages.get(version.version, [])) for version in reg.versions(model)]
    except Exception as exc:  # noqa: BLE001 - an unreadable registry is a row, not a failure of the table
        row = {key: None for key in COLUMNS}
        row.update(kind="registered", name=prefix, path=registry, problem=_describe(exc))
        return [*out, (row, None)]
    for model, version, stages in versions:
        row = {key: None for key in COLUMNS}
        label = f"{prefix}/{model}@{version.version}" + (f" [{', '.join(sorted(stages))}]" if stages else "")
        row.update(kind="registered", name=label, path=version.checkpoint)
        try:
            config = _registered_checkpoint(version.checkpoint, row, None, version.metrics)
            row["date"] = version.created or row["date"]
            out.append((row, flatten(config)))
        except Exception as exc:  # noqa: BLE001
            row["problem"] = _describe(exc)
            out.append((row, None))
    return out


def _card_into_row(checkpoint: str, row: dict[str, Any]):
    """The checkpoint's card: model, input size, date and the abstention figures into the row."""
    from dermaid.models.card import load_card

    card = load_card(checkpoint)
    row.update(checkpoint=checkpoint, model=card.model_name, image_size=card.input_size[-1], date=card.created)
    if card.ood:
        method = card.ood.get("method")
        measured = (card.ood.get("validation") or {}).get(method) or {}
        row.update(ood_method=method, ood_auroc=measured.get("auroc"), refused_share=measured.get("refused_in"))
    if card.triage:
        row.update(triage_cutoff=card.triage.get("cutoff"), triage_sensitivity=card.triage.get("sensitivity"))
    return card


def _metrics_into_row(row: dict[str, Any], metrics: dict[str, Any]) -> None:
    for column in ("balanced_accuracy", "auc_macro", "ece", "ece_calibrated"):
        value = metrics.get(column)
        row[column] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_yaml(url: str) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.create(read_text(url)), resolve=False)
    if not isinstance(data, dict):
        raise DermaidError(f"{url.rsplit('/', 1)[-1]} is not a mapping")
    return data


def _read_json(url: str) -> dict[str, Any]:
    try:
        data = json.loads(read_text(url))
    except json.JSONDecodeError as exc:
        raise DermaidError(f"{url.rsplit('/', 1)[-1]} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DermaidError(f"{url.rsplit('/', 1)[-1]} is not a JSON object")
    return data


def _modified(url: str) -> str | None:
    try:
        fs, path = get_fs(url)
        return pd.Timestamp(fs.modified(path)).isoformat()
    except Exception:  # noqa: BLE001 - not every filesystem keeps modification times
        return None


def _find_number(data: Any, key: str) -> float | None:
    value = _find_value(data, key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _find_value(data: Any, key: str, depth: int = 0) -> Any:
    """`key` (or `<split>/key`) in a summary: top level first, then nested blocks (oof, metrics, ...)."""
    if not isinstance(data, dict) or depth > 3:
        return None
    for k, value in data.items():
        if k == key or str(k).endswith("/" + key):
            return value
    for value in data.values():
        found = _find_value(value, key, depth + 1)
        if found is not None:
            return found
    return None


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


# --------------------------------------------------------------------------- config differences


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": 0.003, ...} (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(baseline: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (baseline value, other value)} for every flattened key that differs (DIFF_IGNORED left out)."""
    def kept(key: str) -> bool:
        return not any(key == ignored or key.startswith(ignored + ".") for ignored in DIFF_IGNORED)

    missing = object()
    diff = {}
    for key in sorted(set(baseline) | set(other)):
        before, after = baseline.get(key, missing), other.get(key, missing)
        if kept(key) and not _same(before, after):
            diff[key] = (None if before is missing else before, None if after is missing else after)
    return diff


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def format_differences(diff: dict[str, tuple[Any, Any]]) -> str:
    """`optim.lr 0.003->0.001; augment.name light->none` (empty: the same config)."""
    return "; ".join(f"{key} {_short(before)}->{_short(after)}" for key, (before, after) in diff.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def _baseline(table: pd.DataFrame, configs: dict[str, dict[str, Any]], baseline: str | None) -> str | None:
    """The name of the baseline row: as given (name, or path), else the oldest run with a readable config."""
    if baseline:
        wanted = absolute_url(baseline) if "://" not in baseline and os.path.sep in baseline else baseline
        for _, row in table.iterrows():
            if baseline == row["name"] or wanted == row["path"] or (row["path"] or "").rstrip("/") == wanted.rstrip("/"):
                if row["name"] not in configs:
                    raise DermaidError(f"baseline={baseline}: that run's config cannot be read ({row['problem']})")
                return str(row["name"])
        names = [n for n in table["name"] if n in configs]
        raise DermaidError(f"baseline={baseline}: no run of that name under {table.attrs.get('root') or 'the root'}; "
                           f"runs: {names}")
    candidates = table[table["name"].isin(list(configs)) & table["kind"].isin(["train", "trial", "cv-fold", "tune"])]
    if candidates.empty:
        return None
    return str(candidates.sort_values("date", na_position="last", kind="stable").iloc[0]["name"])


# --------------------------------------------------------------------------- W&B


def wandb_rows(project: str) -> tuple[list[dict[str, Any]], str]:
    """(rows, note): the runs of a W&B `entity/project` when an API key is set and W&B answers; else no rows and
    a note saying the table holds the local runs only."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled") or not _wandb_key():
        return [], (f"W&B: offline (no WANDB_API_KEY, no `wandb login`, or WANDB_MODE=offline): {project} not read; "
                    "the table holds the local runs")
    try:
        import wandb

        found = [wandb_row(r) for r in wandb.Api(timeout=WANDB_TIMEOUT_S).runs(project)]
    except Exception as exc:  # noqa: BLE001 - network, auth and unknown-project errors all mean: local runs only
        return [], f"W&B: could not read {project} ({_describe(exc)}); the table holds the local runs"
    return found, f"W&B: {len(found)} run(s) from {project} (figures: each run's last logged epoch)"


def _wandb_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    try:
        entry = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return entry[2] if entry else None


def wandb_row(run: Any) -> dict[str, Any]:
    """One W&B run (wandb.apis.public.Run: name, url, created_at, config, summary) as a runs-table row."""
    summary = dict(getattr(run, "summary", {}) or {})
    config = flatten(dict(getattr(run, "config", {}) or {}))
    row: dict[str, Any] = {key: None for key in COLUMNS}
    row.update(kind="wandb", name=str(getattr(run, "name", "")), path=getattr(run, "url", None),
               date=getattr(run, "created_at", None), model=config.get("model.name"),
               image_size=config.get("train.image_size"), dataset_version=config.get("dataset_version"))
    _metrics_into_row(row, {key[len("val/"):]: value for key, value in summary.items() if str(key).startswith("val/")})
    return row
