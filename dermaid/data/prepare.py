"""Prepare a raw dataset into a versioned, sharded form: decode once, resize, re-encode, write Parquet.

    dermaid prepare data=isic2019 data.root=data/isic2019 out=data/prepared tag=v3
    dermaid prepare data=ham10000 data.root=gs://bucket/HAM10000 data.image_size=384
    dermaid prepare data.root=data/toy data.image_size=128 tag=toy ray.address=auto   # on a running cluster

    from dermaid.data.prepare import prepare_dataset, ensure_prepared
    manifest = prepare_dataset(data_cfg, out="data/prepared", tag="toy")
    version_url = ensure_prepared(data_cfg)        # what train/evaluate call

Steps: read records (dermaid.data.isic; data.root plus data.extra roots, the source column
telling them apart) -> lesion-grouped folds (dermaid.data.splits) -> Ray tasks, one per shard of
records sorted by image id: read the raw bytes in the worker, decode with JPEG draft mode, resize
the shorter side to data.image_size, re-encode, write the shard -> the version is a content
hash over the sorted records, the raw image bytes and the settings -> manifest.json is written
last and the temporary directory moves into place as <out>/<version>. The same version is
re-used, never rewritten; a different one gets its own directory. A cache file keyed by the raw
listing (file names, sizes, modification stamps, CSV contents) and the settings lets an
unchanged root skip the decoding entirely.

`in_process=True` decodes the shards one after another in this process instead of in Ray tasks:
no Ray starts, which suits a few hundred images (tests, notebooks); the version is the same
either way. URLs on memory:// exist only in this process, so such data is always prepared in-process.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dermaid.classes import is_missing
from dermaid.config import to_plain
from dermaid.data.isic import DatasetError, raw_files, read_records
from dermaid.data.loading import (
    CACHE_DIR, MANIFEST_FILE, SHARDS_DIR, read_manifest, resolve_version, validate_tag, write_tag,
)
from dermaid.data.shards import prepare_shard
from dermaid.data.splits import assign_folds, split_counts
from dermaid.errors import DermaidError
from dermaid.files import (absolute_url, exists, get_fs, join, publish, read_text, tmp_sibling, write_atomic,
                           write_text)

log = logging.getLogger(__name__)

SETTING_KEYS = ("image_size", "folds", "test_fraction", "seed", "quality")
DEFAULT_SHARD_SIZE = 512  # images per shard and per Ray task (~30 MB of JPEG at 512 px)
MIN_SHARD_SIZE = 16  # below this, task overhead outweighs spreading small sets over more cores
MAX_ERRORS_NAMED = 5


# ---------------------------------------------------------------------------------------------
# Public API


def prepare_settings(data_cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a version (besides the records and image bytes)."""
    missing = [k for k in SETTING_KEYS if data_cfg.get(k) is None]
    if missing:
        raise DermaidError(f"data config lacks {missing} (needed to prepare a dataset)")
    settings = {
        "image_size": int(data_cfg["image_size"]),
        "folds": int(data_cfg["folds"]),
        "test_fraction": float(data_cfg["test_fraction"]),
        "seed": int(data_cfg["seed"]),
        "quality": int(data_cfg["quality"]),
    }
    if settings["image_size"] < 16:
        raise DermaidError(f"data.image_size must be at least 16, got {settings['image_size']}")
    if not 1 <= settings["quality"] <= 100:
        raise DermaidError(f"data.quality must be in 1..100, got {settings['quality']}")
    return settings


def check_raw_roots(data_cfg: dict[str, Any]) -> None:
    """Without data.version the raw roots get prepared: each must exist. Drivers call this before Ray starts,
    so a mistyped data.root is said at once, not after tens of seconds of Ray start-up."""
    if data_cfg["version"]:
        return
    for source in raw_sources(data_cfg):
        if not exists(source["root"]):
            raise DermaidError(f"{source['root']}: the raw data folder does not exist "
                               "(check data.root / data.extra, or give a prepared data.version)")


def raw_sources(data_cfg: dict[str, Any]) -> list[dict[str, str]]:
    """[{root, layout, source}] for data.root and each data.extra entry (a URL or such a dict)."""
    if not data_cfg.get("root"):
        raise DermaidError("data.root is not set: give the raw dataset URL (data.root=...)")
    layout = data_cfg["layout"]
    sources = [{"root": absolute_url(data_cfg["root"]), "layout": layout, "source": data_cfg["source"] or layout}]
    extras = data_cfg["extra"] or []
    if isinstance(extras, (str, dict)):  # `data.extra=URL` on the command line: one root, not a list of characters
        extras = [extras]
    for i, extra in enumerate(extras):
        entry = {"root": extra} if isinstance(extra, str) else dict(extra)
        if not entry.get("root"):
            raise DermaidError(f"data.extra[{i}] has no root: give a URL or {{root, layout, source}}")
        root = absolute_url(entry["root"])
        sources.append({
            "root": root,
            "layout": entry.get("layout") or "isic2019",
            "source": entry.get("source") or root.rstrip("/").rsplit("/", 1)[-1],
        })
    names = [s["source"] for s in sources]
    if len(set(names)) != len(names):
        raise DermaidError(f"data sources need distinct names, got {names}; set data.source / data.extra[i].source")
    return sources


def read_all_records(sources: list[dict[str, str]]) -> pd.DataFrame:
    """Records of every source, concatenated; an image id may occur only once overall."""
    frames = [read_records(s["root"], s["layout"], s["source"]) for s in sources]
    unlisted = {s["source"]: len(f.attrs.get("unlisted", [])) for s, f in zip(sources, frames)}
    records = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    dup = records["image_id"][records["image_id"].duplicated()].tolist()
    if dup:
        raise DatasetError(f"{len(dup)} image id(s) occur in more than one source (e.g. {dup[:MAX_ERRORS_NAMED]}); "
                           "the same image twice would leak between folds: drop one copy")
    records.attrs["unlisted"] = unlisted
    return records


def prepare_dataset(
    data_cfg: dict[str, Any],
    out: str | None = None,
    tag: str | None = None,
    *,
    use_cache: bool = True,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    in_process: bool = False,
) -> dict[str, Any]:
    """Prepare data_cfg's root(s) into <out>/<version>; returns the manifest (idempotent).

    in_process: decode here rather than in Ray tasks (no Ray starts; ray_address and num_cpus unused).
    """
    data_cfg = to_plain(data_cfg)
    out = absolute_url(out or data_cfg["prepared_dir"] or "")
    if not out:
        raise DermaidError("no output directory: set out= or data.prepared_dir")
    if tag is not None:
        validate_tag(tag)
    settings = prepare_settings(data_cfg)
    sources = raw_sources(data_cfg)
    start = time.perf_counter()

    raw_key = _raw_key(sources, settings)
    if use_cache:
        manifest = _from_cache(out, raw_key)
        if manifest is not None:
            log.info("prepare: unchanged raw data; re-using version %s", manifest["version"])
            return _finish(out, manifest, tag)

    records = read_all_records(sources)
    records["fold"] = assign_folds(records, settings["folds"], settings["test_fraction"], settings["seed"])
    records = records.sort_values("image_id", kind="stable").reset_index(drop=True)

    in_process = in_process or not all(_ray_capable(u) for u in [out, *(s["root"] for s in sources)])
    tmp_url = tmp_sibling(join(out, "prepare"))  # a fresh location no reader lists; `dermaid gc` removes a crash's
    fs, tmp_path = get_fs(tmp_url)
    fs.makedirs(tmp_path, exist_ok=True)
    try:
        shards, results = _run_shards(records, tmp_url, settings, in_process, ray_address, num_cpus, shard_size)
        raw_sha = {image_id: sha for r in results for image_id, sha, _, _ in r["images"]}
        version = _version_hash(records, raw_sha, settings)
        final_url = join(out, version)
        if exists(join(final_url, MANIFEST_FILE)):
            log.info("prepare: version %s exists already; re-using it", version)
            manifest = read_manifest(final_url)
        else:
            manifest = {
                "version": version,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": {"layout": sources[0]["layout"], "root": sources[0]["root"], "name": sources[0]["source"],
                           "extra": sources[1:], "unlisted": records.attrs.get("unlisted", {})},
                "settings": settings,
                "num_records": int(len(records)),
                "counts": split_counts(records["label"].tolist(), records["fold"].tolist()),
                "shards": shards,
                "tags": [],
                "raw_key": raw_key,
                "image_bytes": int(sum(r["bytes"] for r in results)),
                "prepare_seconds": round(time.perf_counter() - start, 2),
            }
            _commit(tmp_url, final_url, manifest)
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)
    write_text(join(out, CACHE_DIR, f"{raw_key}.json"), json.dumps({"version": manifest["version"]}))
    log.info("prepare: %d images -> %s in %.1f s", manifest["num_records"], join(out, manifest["version"]),
             time.perf_counter() - start)
    return _finish(out, manifest, tag)


def ensure_prepared(data_cfg: dict[str, Any], ray_address: str | None = None, num_cpus: int | None = None) -> str:
    """The version URL train/evaluate use: data.version resolved, else data.root prepared (cached).

    ray_address, num_cpus: the Ray a prepare that needs it joins or starts (the caller's ray.address, ray.num_cpus).
    """
    data_cfg = to_plain(data_cfg)
    prepared_dir = data_cfg["prepared_dir"]
    if not prepared_dir:
        raise DermaidError("data.prepared_dir is not set")
    if data_cfg["version"]:
        return resolve_version(prepared_dir, str(data_cfg["version"]))
    manifest = prepare_dataset(data_cfg, out=prepared_dir, tag=data_cfg["tag"], ray_address=ray_address,
                               num_cpus=num_cpus)
    return join(absolute_url(prepared_dir), manifest["version"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid prepare data=... data.root=URL out=URL [tag=NAME] [force=true]`."""
    manifest = prepare_dataset(
        to_plain(cfg.data), out=str(cfg.out or ""), tag=cfg.tag, use_cache=not bool(cfg.force),
        ray_address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, shard_size=int(cfg.shard_size),
    )
    url = join(absolute_url(str(cfg.out)), manifest["version"])
    print(f"dataset version {manifest['version']}: {manifest['num_records']} images at {url}")
    print("images per class: " + ", ".join(f"{c}={n}" for c, n in manifest["counts"]["class"].items()))
    print("images per fold (-1 = test): " + ", ".join(f"{f}={n}" for f, n in manifest["counts"]["fold"].items()))
    if manifest.get("tags"):
        print(f"tags: {', '.join(manifest['tags'])}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Helpers


def _ray_capable(url: str) -> bool:
    return not str(url).startswith("memory://")


def _chunks(n: int, shard_size: int, parallelism: int) -> list[tuple[int, int]]:
    """(start, stop) ranges: at most shard_size each, at least 2 per core when the set is big enough."""
    count = max(math.ceil(n / max(1, shard_size)), min(math.ceil(n / MIN_SHARD_SIZE), 2 * max(1, parallelism)), 1)
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run_shards(records: pd.DataFrame, tmp_url: str, settings: dict[str, Any], in_process: bool,
                ray_address: str | None, num_cpus: int | None, shard_size: int) -> tuple[list[str], list[dict]]:
    rows = records[["image_id", "image_url", "label", "age", "sex", "site", "lesion_id", "source", "fold"]]
    rows = rows.astype(object).where(rows.notna(), None).to_dict("records")
    if in_process:
        parallelism = os.cpu_count() or 1  # the shard layout a local Ray on this machine would choose
    else:
        import ray

        from dermaid.ray_runtime import ensure_ray

        ensure_ray(ray_address, num_cpus)
        parallelism = int(ray.cluster_resources().get("CPU", 1))
    ranges = _chunks(len(rows), shard_size, parallelism)
    shards = [f"{SHARDS_DIR}/part-{i:05d}.parquet" for i in range(len(ranges))]
    progress = _Progress(len(rows), len(ranges))
    results: list[dict | None] = [None] * len(ranges)
    if in_process:
        for i, (a, b) in enumerate(ranges):
            results[i] = prepare_shard(rows[a:b], join(tmp_url, shards[i]), settings)
            progress.update(b - a)
    else:
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(prepare_shard)
        pending = {task.remote(rows[a:b], join(tmp_url, shards[i]), settings): i for i, (a, b) in enumerate(ranges)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                progress.update(ranges[i][1] - ranges[i][0])
    progress.close()
    errors = [e for r in results for e in r["errors"]]  # type: ignore[index]
    if errors:
        named = "; ".join(f"{url}: {msg}" for url, msg in errors[:MAX_ERRORS_NAMED])
        more = f" (and {len(errors) - MAX_ERRORS_NAMED} more)" if len(errors) > MAX_ERRORS_NAMED else ""
        raise DatasetError(f"{len(errors)} image(s) could not be prepared: {named}{more}")
    return shards, results  # type: ignore[return-value]


class _Progress:
    """A tqdm bar on a terminal, a log line per ~10% otherwise."""

    def __init__(self, total: int, shards: int) -> None:
        self.total, self.done, self.next_log = total, 0, 0.1
        self.start = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="prepare", file=sys.stderr)
        log.info("prepare: %d images in %d shard(s)", total, shards)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done / max(1, self.total) >= self.next_log or self.done == self.total:
            rate = self.done / max(1e-6, time.perf_counter() - self.start)
            log.info("prepare: %d/%d images (%.0f img/s)", self.done, self.total, rate)
            self.next_log = self.done / max(1, self.total) + 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _version_hash(records: pd.DataFrame, raw_sha: dict[str, str], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for row in records.itertuples(index=False):
        age = None if is_missing(row.age) else float(row.age)
        fields = [row.image_id, row.label, age, row.sex, row.site, row.lesion_id, row.source, int(row.fold),
                  raw_sha[row.image_id]]
        h.update(json.dumps([None if is_missing(v) else v for v in fields]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _raw_key(sources: list[dict[str, str]], settings: dict[str, Any]) -> str:
    """Cheap fingerprint of the raw inputs: CSV contents, image names + sizes + change stamps."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sources:
        h.update(json.dumps(source, sort_keys=True).encode())
        fs, root = get_fs(source["root"])
        for name in raw_files(source["root"], source["layout"]):
            path = f"{root.rstrip('/')}/{name}"
            try:
                if name.endswith(".csv"):
                    if fs.exists(path):
                        h.update(name.encode() + hashlib.sha256(fs.cat_file(path)).digest())
                    continue
                if not fs.isdir(path):
                    continue
                listing = fs.find(path, detail=True)
            except (OSError, ValueError):
                continue  # the reader reports unreadable inputs with a proper message
            for file_path in sorted(listing):
                info = listing[file_path]
                stamp = [info.get(k) for k in ("size", "mtime", "md5Hash", "crc32c", "ETag", "LastModified")]
                h.update(json.dumps([file_path, stamp], default=str).encode())
    return h.hexdigest()[:24]


def _from_cache(out: str, raw_key: str) -> dict[str, Any] | None:
    url = join(out, CACHE_DIR, f"{raw_key}.json")
    try:
        version = json.loads(read_text(url))["version"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None
    if not exists(join(out, version, MANIFEST_FILE)):
        return None
    return read_manifest(join(out, version))


def _commit(tmp_url: str, final_url: str, manifest: dict[str, Any]) -> None:
    """Publish the filled temporary directory as final_url in one step (dermaid.files.publish: a rename on local
    disk; on object stores a copy with manifest.json last); a version counts once its manifest.json exists."""
    write_text(join(tmp_url, MANIFEST_FILE), json.dumps(manifest, indent=2, sort_keys=False))
    # a directory there without a manifest is a crash's leftover (never read): replace it; one with a manifest
    # was committed meanwhile by a run on the same raw data (the same content, its hash is the name): keep it
    overwrite = not exists(join(final_url, MANIFEST_FILE))
    try:
        publish(tmp_url, final_url, overwrite=overwrite, markers=(MANIFEST_FILE,))
    except FileExistsError:
        if not exists(join(final_url, MANIFEST_FILE)):
            raise


def _finish(out: str, manifest: dict[str, Any], tag: str | None) -> dict[str, Any]:
    """Point a tag at the version (recorded in tags/ and the manifest's tag list)."""
    if not tag:
        return manifest
    previous = write_tag(out, tag, manifest["version"])
    if previous and previous != manifest["version"]:
        log.warning("prepare: tag %r moved from %s to %s", tag, previous, manifest["version"])
    if tag not in manifest.get("tags", []):
        manifest = {**manifest, "tags": [*manifest.get("tags", []), tag]}
        version_url = join(out, manifest["version"])
        write_atomic(join(version_url, MANIFEST_FILE), json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest
