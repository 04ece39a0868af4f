"""`dermaid gc`: name and remove what crashed publishes left behind (conf/gc.yaml).

    dermaid gc dry_run=true                 # name the garbage under runs/, data/prepared, reports/, registry/
    dermaid gc                              # ... and remove what is older than grace_hours
    dermaid gc root=gs://bucket/registry    # one root only

Every publish writes to a fresh `<name>.tmp-<UTC stamp>-<id>` location first (dermaid.files.atomic_dir,
write_atomic, write_exclusive) and makes it visible by one small step. A crash before that step leaves:
  - a `*.tmp-*` directory or file (any root),
  - on object stores, where a directory is copied into place object by object with its marker last: a
    registry version without version.json, or a dataset version without manifest.json (readers skip both),
  - a registry write probe (`.write-probe-*`),
  - on object stores, where a checkpoint is replaced in place (dermaid.files._publish_by_copy: the new weights
    under a fresh name, dermaid.files.versioned_name, beside the old ones, then card.json switched, then the old
    weights removed): weights that the directory's card.json does not name ("unreferenced-weights"): a versioned
    file (model-v<stamp>-<id>.pt: the new weights of a replacement that died before its card switch, or old ones),
    or the plain model.pt beside a card naming a versioned model-v...pt (old weights of a replacement that died
    after its card switch).
Nothing younger than the grace period is touched: a publish may still be running (a large dataset version
takes a while; a replacement's new weights wait for their card). Readers never use any of these (readers go by
the marker, and the card names its weights), so removing them changes nothing anyone sees.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dermaid.errors import DermaidError
from dermaid.files import (TMP_INFIX, absolute_url, get_fs, is_local, is_versioned_name, tmp_age_seconds,
                           unversioned_name, versioned_age_seconds)
from dermaid.models.card import CARD_FILE

_DATASET_VERSION = re.compile(r"^[0-9a-f]{16}$")  # dermaid.data.loading.VERSION_PATTERN


@dataclass(frozen=True)
class Garbage:
    url: str
    kind: str            # tmp | incomplete-version | incomplete-dataset | probe | unreferenced-weights
    age_s: float | None  # None: the store gives no time (never removed)
    size: int


def find_garbage(root: str, max_depth: int = 8) -> list[Garbage]:
    """Crash leftovers under `root`, whatever their age (see the module docstring)."""
    fs, base = get_fs(absolute_url(root))
    if not fs.exists(base):
        return []
    found: list[Garbage] = []
    now = _dt.datetime.now(_dt.timezone.utc)
    _walk(fs, base.rstrip("/"), 0, max_depth, now, found)
    if is_local(root):
        return found
    return [Garbage(fs.unstrip_protocol(g.url), g.kind, g.age_s, g.size) for g in found]


def collect(root: str, grace_s: float, dry_run: bool, max_depth: int = 8) -> tuple[list[Garbage], list[Garbage]]:
    """(removed or, dry_run, to be removed; kept because younger than grace_s or of unknown age)."""
    due, kept = [], []
    for item in find_garbage(root, max_depth):
        (due if item.age_s is not None and item.age_s >= grace_s else kept).append(item)
    if not dry_run:
        for item in due:
            fs, path = get_fs(item.url)
            fs.rm(path, recursive=True)
    return due, kept


def run(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    roots = [plain["root"]] if plain.get("root") else list(plain["roots"] or [])
    if not roots:
        raise DermaidError("gc: no roots (set root=DIR or roots=[...])")
    grace_h = plain["grace_hours"]
    if not isinstance(grace_h, (int, float)) or isinstance(grace_h, bool) or grace_h < 0:
        raise DermaidError(f"gc: grace_hours={grace_h!r} must be a number >= 0")
    dry_run = bool(plain["dry_run"])
    total_due, total_kept = [], []
    for root in roots:
        due, kept = collect(str(root), float(grace_h) * 3600, dry_run, int(plain["max_depth"]))
        total_due += due
        total_kept += kept
        print(f"{absolute_url(str(root))}: {len(due)} {'to remove' if dry_run else 'removed'}, {len(kept)} kept "
              f"(younger than {grace_h} h or of unknown age)")
        for item in due + kept:
            state = ("would remove" if dry_run else "removed") if item in due else "kept"
            age = f"{item.age_s / 3600:.1f} h" if item.age_s is not None else "age ?"
            print(f"  {state:<12} {item.kind:<19} {age:>8} {item.size / 1e6:>9.1f} MB  {item.url}")
    return {"removed" if not dry_run else "would_remove": [g.url for g in total_due],
            "kept": [g.url for g in total_kept]}


def _walk(fs, path: str, depth: int, max_depth: int, now: _dt.datetime, found: list[Garbage]) -> None:
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return
    parent = path.rsplit("/", 1)[-1]
    artifact = _card_artifact(fs, path, entries)  # None: not a checkpoint (or an unreadable card: touch nothing)
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        is_dir = entry["type"] == "directory"
        if artifact is not None and not is_dir and _unreferenced_weights(name, artifact):
            size, newest = _usage(fs, entry)
            found.append(Garbage(entry["name"], "unreferenced-weights",
                                 _younger(_age(newest, now), versioned_age_seconds(name, now)), size))
            continue
        if TMP_INFIX in name:
            age = tmp_age_seconds(name, now)
            size, newest = _usage(fs, entry)
            found.append(Garbage(entry["name"], "tmp", age if age is not None else _age(newest, now), size))
            continue
        if name.startswith(".write-probe-"):
            size, newest = _usage(fs, entry)
            found.append(Garbage(entry["name"], "probe", _age(newest, now), size))
            continue
        if is_dir and parent == "versions" and _in_registry(fs, path):
            if not fs.exists(f"{entry['name']}/version.json"):
                size, newest = _usage(fs, entry)
                found.append(Garbage(entry["name"], "incomplete-version", _age(newest, now), size))
            continue  # a complete version is immutable: nothing inside it to look at
        if is_dir and _DATASET_VERSION.match(name) and fs.exists(f"{entry['name']}/shards"):
            if not fs.exists(f"{entry['name']}/manifest.json"):
                size, newest = _usage(fs, entry)
                found.append(Garbage(entry["name"], "incomplete-dataset", _age(newest, now), size))
            continue  # a complete dataset version: thousands of shards, no leftovers inside
        if is_dir and depth + 1 < max_depth:
            _walk(fs, entry["name"], depth + 1, max_depth, now, found)


def _card_artifact(fs, path: str, entries: list[dict[str, Any]]) -> str | None:
    """The `artifact` named by `path`/card.json, when the directory has a readable one."""
    if not any(e["type"] != "directory" and e["name"].rstrip("/").rsplit("/", 1)[-1] == CARD_FILE for e in entries):
        return None
    try:
        artifact = json.loads(fs.cat_file(f"{path}/{CARD_FILE}")).get("artifact")
    except (OSError, ValueError, AttributeError):  # gone meanwhile, not JSON, not an object
        return None
    return artifact if isinstance(artifact, str) and artifact else None


def _unreferenced_weights(name: str, artifact: str) -> bool:
    """A versioned weights file the card does not name, or the plain name beside a card naming a versioned one."""
    if name == artifact:
        return False
    return is_versioned_name(name) or (is_versioned_name(artifact) and name == unversioned_name(artifact))


def _younger(*ages: float | None) -> float | None:
    known = [a for a in ages if a is not None]
    return min(known) if known else None


def _in_registry(fs, versions_dir: str) -> bool:
    """<root>/<name>/versions: a registry's (its root holds registry.json), not any folder called versions."""
    root = versions_dir.rstrip("/").rsplit("/", 2)[0]
    return fs.exists(f"{root}/registry.json")


def _usage(fs, entry: dict[str, Any]) -> tuple[int, Any]:
    """(bytes, newest modification time) of a file or a directory's files."""
    if entry["type"] != "directory":
        return int(entry.get("size") or 0), _modified(entry)
    infos = fs.find(entry["name"], detail=True, withdirs=True)
    times = [t for t in (_modified(i) for i in [entry, *infos.values()]) if t is not None]
    return sum(int(i.get("size") or 0) for i in infos.values() if i["type"] != "directory"), (max(times) if times
                                                                                            else None)


def _modified(info: dict[str, Any]) -> _dt.datetime | None:
    for key in ("mtime", "updated", "LastModified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return _dt.datetime.fromtimestamp(float(value), _dt.timezone.utc)
        if isinstance(value, str):
            try:
                value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, _dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
    return None


def _age(when: _dt.datetime | None, now: _dt.datetime) -> float | None:
    return None if when is None else (now - when).total_seconds()
