"""The model registry: immutable model versions and stages that point at them.

    reg = Registry("registry")                       # any fsspec URL: a local dir, gs://bucket/registry, memory://
    mv = reg.register("runs/toy/best", "isic")       # copy -> <root>/isic/versions/<version>/ (never replaced)
    reg.promote("isic", mv.version, by="alice")      # CardCheckError / PromotionConflict; the stage is unchanged
    reg.stage("isic", "production").checkpoint       # what Predictor(...) loads; Serve polls this
    reg.rollback("isic")                             # back to the version promoted before the current one
    resolve_model_url("registry://isic/production", "registry")   # -> (checkpoint URL, version)

Layout (docs/interfaces.md):
    <root>/registry.json                          which registry this is (id): versions carry it
    <root>/<name>/versions/<version>/model/       the checkpoint (card.json + weights + OOD statistics)
    <root>/<name>/versions/<version>/version.json written last: the version exists once it is there
    <root>/<name>/stages/<stage>/history/<generation>.json   one immutable record per promotion / rollback
    <root>/<name>/stages/<stage>.json             the pointer: a copy of the newest record, written last

How a stage changes without ever being torn, on local disk and on object stores (no locks, no rename of
directories): a promotion reads the stage's generation g, then CREATES history/<g+1>.json exclusively
(files.write_exclusive: link(2) on local disk, a conditional PUT on gs://). That creation is the commit and
the compare-and-swap: of two promotions from the same g exactly one creates the file, the other gets
PromotionConflict and changes nothing. Only then is the small pointer written (files.write_atomic: one
rename or one PUT). A reader (`stage`) reads the pointer and follows history forward while a newer record
exists, so a pointer left behind by a crash between the two writes, or by a slow writer, never shows an older
stage than the history holds.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import getpass
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dermaid.errors import DermaidError
from dermaid.files import (TMP_INFIX, absolute_url, atomic_dir, exists, get_fs, is_local, join,
                           read_text, write_atomic, write_bytes, write_exclusive)

REGISTRY_FILE = "registry.json"
VERSION_FILE = "version.json"
MODEL_DIR = "model"
VERSIONS_DIR = "versions"
STAGES_DIR = "stages"
HISTORY_DIR = "history"
DEFAULT_STAGE = "production"
SCHEME = "registry://"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no '/', '@' or spaces: they parse URLs
_GENERATION_DIGITS = 8


class RegistryError(DermaidError, ValueError):
    """An unknown model, version or stage; a registry that cannot be written; a version from elsewhere."""


class CardCheckError(RegistryError):
    """A version whose model card fails the promotion checks (dermaid.registry.checks)."""


class PromotionConflict(RegistryError):
    """Another promotion or rollback of the same stage committed first; this one changed nothing."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered, immutable model version (its version.json)."""

    name: str
    version: str
    checkpoint: str                      # <root>/<name>/versions/<version>/model: what Predictor loads
    created: str                         # UTC ISO
    registered_by: str
    source: str                          # the checkpoint it was copied from
    model: str                           # the timm backbone
    card_id: str                         # dermaid.models.card.model_version of its card
    metrics: dict[str, Any] = field(default_factory=dict)   # test metrics (the evaluation's), else the card's
    dataset_versions: list[str] = field(default_factory=list)
    registry_id: str = ""
    problems: list[str] = field(default_factory=list)       # card check results at registration ([]: promotable)
    provenance: dict[str, Any] = field(default_factory=dict)  # free-form: dataset_version, config_key, ...


@dataclass(frozen=True)
class StagePointer:
    """Where a stage points: one record of its history."""

    name: str
    stage: str
    version: str
    checkpoint: str                      # the version's checkpoint directory (Predictor(checkpoint) loads it)
    promoted_at: str                     # UTC ISO
    promoted_by: str
    from_version: str | None             # the version the stage had before this change
    metrics: dict[str, Any] = field(default_factory=dict)   # the version's test metrics
    generation: int = 0                  # 1, 2, ...: the history record's number
    action: str = "promote"              # promote | rollback
    stack: list[str] = field(default_factory=list)          # versions a rollback walks back through, newest last


class Registry:
    """Model versions and stages under one fsspec root."""

    def __init__(self, root: str) -> None:
        if not str(root).strip():
            raise RegistryError("registry root is empty: give a local directory or a URL (root=...)")
        self.root = absolute_url(str(root))

    # ------------------------------------------------------------------------------------ reading

    def models(self) -> list[str]:
        """Names with at least one complete version, sorted (one version.json read per name, not all of them)."""
        return sorted(name for name in self._names() if NAME_PATTERN.match(name) and TMP_INFIX not in name
                      and next(self._complete_versions(name), None) is not None)

    def versions(self, name: str) -> list[ModelVersion]:
        """The complete versions of `name` (version.json present), oldest first; [] for an unknown name."""
        return sorted(self._complete_versions(_check_name(name, "model name")), key=lambda v: (v.created, v.version))

    def _complete_versions(self, name: str) -> Iterator[ModelVersion]:
        """`name`'s complete versions in listing order, each read when asked for."""
        fs, path = get_fs(join(self.root, name, VERSIONS_DIR))
        if not fs.exists(path):
            return
        for entry in fs.ls(path, detail=False):
            version = entry.rstrip("/").rsplit("/", 1)[-1]
            if TMP_INFIX in version or not NAME_PATTERN.match(version):
                continue  # a publish in progress, or crash garbage (dermaid gc)
            record = self._read_version(name, version)
            if record is not None:
                yield record

    def version(self, name: str, version: str) -> ModelVersion:
        """One version; RegistryError naming what exists when it does not (or when it is from elsewhere)."""
        _check_name(name, "model name")
        _check_name(version, "version")
        record = self._read_version(name, version)
        if record is None:
            elsewhere = [other for other in self._names() if other != name
                         and self._read_version(other, version) is not None]
            known = [v.version for v in self.versions(name)]
            hint = (f"; {version!r} is a version of {elsewhere[0]!r}, not of {name!r}" if elsewhere else
                    f"; known versions of {name!r}: {known}" if known else f"; {name!r} has no versions here")
            raise RegistryError(f"{self.root}: unknown version {name}@{version}{hint}")
        if record.name != name:
            raise RegistryError(f"{self.root}: {name}@{version} was registered as model {record.name!r} "
                                "(copied from elsewhere?): register it under this name instead")
        own = self.registry_id()
        if own and record.registry_id and record.registry_id != own:
            raise RegistryError(f"{self.root}: {name}@{version} belongs to another registry ({record.registry_id}, "
                                f"this one is {own}): register its checkpoint here with `dermaid registry register`")
        return record

    def stage(self, name: str, stage: str = DEFAULT_STAGE) -> StagePointer | None:
        """Where the stage points now (None when nothing was ever promoted to it). Cheap enough to poll: one
        small read and one existence check."""
        record = self._head(_check_name(name, "model name"), _check_name(stage, "stage"))
        return _pointer(record) if record else None

    def history(self, name: str, stage: str = DEFAULT_STAGE) -> list[StagePointer]:
        """Every record of the stage, oldest first."""
        fs, path = get_fs(self._history_dir(name, stage))
        if not fs.exists(path):
            return []
        records = []
        for entry in sorted(fs.ls(path, detail=False)):
            base = entry.rsplit("/", 1)[-1]
            if base.endswith(".json") and base[:-5].isdigit():
                records.append(_pointer(json.loads(read_text(_url_like(self.root, entry)))))
        return records

    def stages(self, name: str) -> list[str]:
        fs, path = get_fs(join(self.root, name, STAGES_DIR))
        if not fs.exists(path):
            return []
        return sorted(e.rsplit("/", 1)[-1][:-5] for e in fs.ls(path, detail=False)
                      if e.endswith(".json") and TMP_INFIX not in e)

    def registry_id(self) -> str | None:
        url = join(self.root, REGISTRY_FILE)
        if not exists(url):
            return None
        return str(json.loads(read_text(url)).get("id") or "") or None

    # ------------------------------------------------------------------------------------ writing

    def register(self, checkpoint_url: str, name: str, version: str | None = None, *,
                 metrics: dict[str, Any] | None = None, by: str | None = None,
                 provenance: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None
                 ) -> ModelVersion:
        """Copy the checkpoint into <root>/<name>/versions/<version>/ (written once, never replaced).

        version None: the card's id (dermaid.models.card.model_version), so the same checkpoint is not
        registered twice. metrics: the test metrics to show with promotions (default: the card's);
        provenance: kept in version.json; extra_files: {file name: bytes} written beside model/ (metrics.json).
        RegistryError when the version exists or the registry cannot be written (before anything is copied)."""
        from dermaid.models.card import load_card, model_version
        from dermaid.registry.checks import check_card

        _check_name(name, "model name")
        source = absolute_url(checkpoint_url)
        card = load_card(source)  # CheckpointError (a DermaidError) when it is no checkpoint
        version = _check_name(version or model_version(card), "version")
        self._ensure_writable()   # before anything is copied
        registry_id = self._ensure_registry_file()
        target = join(self.root, name, VERSIONS_DIR, version)
        if exists(join(target, VERSION_FILE)):
            raise RegistryError(f"{self.root}: {name}@{version} is registered already; versions are immutable "
                                "(register the new checkpoint under another version)")
        record = ModelVersion(
            name=name, version=version, checkpoint=join(target, MODEL_DIR), created=_utc_now(),
            registered_by=by or _user(), source=source, model=card.model_name, card_id=model_version(card),
            metrics=dict(metrics if metrics is not None else card.metrics), dataset_versions=card.trained_on,
            registry_id=registry_id, problems=check_card(card, source), provenance=dict(provenance or {}))
        fs, src = get_fs(source)
        try:
            with atomic_dir(target, overwrite=False) as tmp:
                for path in sorted(fs.find(src, detail=False)):
                    relative = path[len(src.rstrip("/")):].lstrip("/")
                    if relative and TMP_INFIX not in relative:
                        write_bytes(join(tmp, MODEL_DIR, relative), fs.cat_file(path))
                for file_name, data in (extra_files or {}).items():
                    write_bytes(join(tmp, _check_name(file_name, "file name")), data)
                write_text_json(join(tmp, VERSION_FILE), dataclasses.asdict(record))  # the marker: last
        except FileExistsError:
            raise RegistryError(f"{self.root}: {name}@{version} exists already (registered meanwhile, or a "
                                "half-written copy from a crash: `dermaid gc root=ROOT grace_hours=0` removes that once no "
                                "register is running)") from None
        return record

    def promote(self, name: str, version: str, stage: str = DEFAULT_STAGE, by: str | None = None) -> StagePointer:
        """Point `stage` at `version` after its card passes the checks (CardCheckError with every reason);
        PromotionConflict when another promotion of the stage committed first. The stage is unchanged on
        any error."""
        from dermaid.models.card import CheckpointError, load_card
        from dermaid.registry.checks import check_card

        _check_name(stage, "stage")
        record = self.version(name, version)
        try:
            problems = check_card(load_card(record.checkpoint), record.checkpoint)
        except CheckpointError as exc:
            problems = [str(exc)]
        if problems:
            raise CardCheckError(f"{name}@{version} cannot be promoted to {stage}; the stage is unchanged:\n  - "
                                 + "\n  - ".join(problems))
        self._ensure_writable()
        head = self._head(name, stage)
        if head and head["version"] == version:
            return _pointer(head)  # already there: nothing to record
        stack = [*(head["stack"] if head else []), version]
        return self._commit(name, stage, head, version, "promote", stack, by)

    def rollback(self, name: str, stage: str = DEFAULT_STAGE, by: str | None = None) -> StagePointer:
        """Point `stage` back at the version promoted before the current one (a second rollback goes one
        further back). RegistryError when there is nothing to go back to; the stage is unchanged on errors."""
        _check_name(name, "model name")
        _check_name(stage, "stage")
        head = self._head(name, stage)
        if head is None:
            raise RegistryError(f"{self.root}: {name} has no {stage!r} stage yet; nothing to roll back")
        stack = list(head.get("stack") or [head["version"]])
        if len(stack) < 2:
            raise RegistryError(f"{self.root}: {name}/{stage} points at its first promoted version "
                                f"{head['version']}; there is no earlier version to roll back to")
        self._ensure_writable()
        target = stack[-2]
        self.version(name, target)  # still there and ours
        return self._commit(name, stage, head, target, "rollback", stack[:-1], by)

    # ------------------------------------------------------------------------------------ internals

    def _commit(self, name: str, stage: str, head: dict[str, Any] | None, version: str, action: str,
                stack: list[str], by: str | None) -> StagePointer:
        generation = (head["generation"] if head else 0) + 1
        target = self.version(name, version)
        record = {"name": name, "stage": stage, "version": version, "checkpoint": target.checkpoint,
                  "promoted_at": _utc_now(), "promoted_by": by or _user(),
                  "from_version": head["version"] if head else None, "metrics": target.metrics,
                  "generation": generation, "action": action, "stack": stack}
        data = json.dumps(record, indent=2, default=str).encode("utf-8")
        try:
            write_exclusive(self._history_file(name, stage, generation), data)   # the commit (compare-and-swap)
        except FileExistsError:
            now = self._head(name, stage) or {}
            raise PromotionConflict(
                f"{name}/{stage} changed while this {action} ran: it now points at {now.get('version')} "
                f"({now.get('action')} by {now.get('promoted_by')} at {now.get('promoted_at')}); this {action} of "
                f"{version} changed nothing; check `dermaid registry show {name}` and run it again if still wanted"
            ) from None
        if not exists(self._history_file(name, stage, generation + 1)):  # a newer commit writes its own pointer
            write_atomic(self._pointer_file(name, stage), data)
        return _pointer(record)

    def _head(self, name: str, stage: str) -> dict[str, Any] | None:
        """The newest history record: from the pointer, followed forward past records it does not show yet."""
        record: dict[str, Any] | None = None
        try:
            record = json.loads(read_text(self._pointer_file(name, stage)))
        except FileNotFoundError:
            records = self.history(name, stage)
            if records:
                record = self._read_record(name, stage, records[-1].generation)
        generation = record["generation"] if record else 0
        while exists(self._history_file(name, stage, generation + 1)):
            generation += 1
            record = self._read_record(name, stage, generation)
        return record

    def _read_record(self, name: str, stage: str, generation: int) -> dict[str, Any]:
        return json.loads(read_text(self._history_file(name, stage, generation)))

    def _read_version(self, name: str, version: str) -> ModelVersion | None:
        url = join(self.root, name, VERSIONS_DIR, version, VERSION_FILE)
        if not exists(url):
            return None
        data = json.loads(read_text(url))
        known = {f.name for f in dataclasses.fields(ModelVersion)}
        data = {k: v for k, v in data.items() if k in known}
        # the checkpoint where it is now (a registry copied to another bucket still reads its own files)
        data["checkpoint"] = join(self.root, name, VERSIONS_DIR, version, MODEL_DIR)
        return ModelVersion(**data)

    def _names(self) -> list[str]:
        fs, path = get_fs(self.root)
        if not fs.exists(path):
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False) if fs.isdir(e)]

    def _history_dir(self, name: str, stage: str) -> str:
        return join(self.root, name, STAGES_DIR, stage, HISTORY_DIR)

    def _history_file(self, name: str, stage: str, generation: int) -> str:
        return join(self._history_dir(name, stage), f"{generation:0{_GENERATION_DIGITS}d}.json")

    def _pointer_file(self, name: str, stage: str) -> str:
        return join(self.root, name, STAGES_DIR, f"{stage}.json")

    def _ensure_writable(self) -> None:
        """RegistryError naming the root when a small file cannot be written and removed there."""
        probe = join(self.root, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            if is_local(self.root):
                os.makedirs(self.root, exist_ok=True)
                if not os.access(self.root, os.W_OK):
                    raise PermissionError(f"no write permission on {self.root}")
            write_bytes(probe, b"")
            fs, path = get_fs(probe)
            fs.rm_file(path)
        except OSError as exc:
            raise RegistryError(f"registry {self.root} is not writable ({type(exc).__name__}: {exc}); nothing was "
                                "copied or changed") from None

    def _ensure_registry_file(self) -> str:
        url = join(self.root, REGISTRY_FILE)
        existing = self.registry_id()
        if existing:
            return existing
        data = {"kind": "dermaid-model-registry", "format_version": 1, "id": uuid.uuid4().hex,
                "created": _utc_now()}
        try:
            write_exclusive(url, json.dumps(data, indent=2).encode("utf-8"))
        except FileExistsError:
            pass  # created meanwhile by another register: use that one
        return str(self.registry_id())


def resolve_model_url(url: str, registry_root: str) -> tuple[str, str]:
    """registry://NAME/STAGE, registry://NAME@VERSION (registry://NAME: its production stage) or a checkpoint
    path -> (checkpoint URL, version). A plain path's version: its registry version when it is one, else
    its card's id."""
    url = str(url).strip()
    if not url.startswith(SCHEME):
        from dermaid.models.card import load_card, model_version

        checkpoint = absolute_url(url)
        parent = checkpoint.rstrip("/").rsplit("/", 1)[0]
        marker = join(parent, VERSION_FILE)
        if checkpoint.rstrip("/").endswith("/" + MODEL_DIR) and exists(marker):
            return checkpoint, str(json.loads(read_text(marker))["version"])
        return checkpoint, model_version(load_card(checkpoint))
    ref = url[len(SCHEME):].strip("/")
    registry = Registry(registry_root)
    if "@" in ref:
        name, _, version = ref.partition("@")
        return registry.version(name, version).checkpoint, version
    name, _, stage = ref.partition("/")
    stage = stage or DEFAULT_STAGE
    if not name or "/" in stage:
        raise RegistryError(f"{url}: expected registry://NAME/STAGE or registry://NAME@VERSION")
    pointer = registry.stage(name, stage)
    if pointer is None:
        known = [v.version for v in registry.versions(name)]
        raise RegistryError(f"{url}: nothing promoted to {name}/{stage} in {registry.root}"
                            + (f" (versions: {known}; `dermaid registry promote {name}@VERSION`)" if known
                               else f" ({name!r} has no versions there)"))
    return pointer.checkpoint, pointer.version


def write_text_json(url: str, data: Any) -> None:
    write_bytes(url, json.dumps(data, indent=2, default=str).encode("utf-8"))


def _pointer(record: dict[str, Any]) -> StagePointer:
    known = {f.name for f in dataclasses.fields(StagePointer)}
    return StagePointer(**{k: v for k, v in record.items() if k in known})


def _check_name(value: Any, what: str) -> str:
    value = str(value) if value is not None else ""
    if not NAME_PATTERN.match(value):
        raise RegistryError(f"invalid {what} {value!r}: use letters, digits, '.', '_', '-' (at most 128, no '/' "
                            "or '@')")
    return value


def _url_like(root: str, path: str) -> str:
    """A path from fs.ls under `root` back as a URL of root's filesystem."""
    if is_local(root) or "://" not in root:
        return path
    return get_fs(root)[0].unstrip_protocol(path)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


