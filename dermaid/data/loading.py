"""Reading prepared dataset versions (the output of `dermaid prepare`): manifests, tags, records.

    from dermaid.data.loading import resolve_version, read_manifest, load_records
    url = resolve_version("data/prepared", "toy")            # a tag, a version hash or "latest"
    train = load_records(url, split="train", fold=0)         # DataFrame incl. the JPEG bytes column

Layout (docs/interfaces.md):
    <prepared_dir>/<version>/manifest.json, <prepared_dir>/<version>/shards/part-00000.parquet ...
    <prepared_dir>/tags/<tag>   (a text file holding a version id)
A version directory counts only once its manifest.json exists (prepare writes it last, in a
temporary directory that is then moved into place).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermaid.data.shards import SHARD_SCHEMA
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, exists, get_fs, join, read_text, write_atomic

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
TAGS_DIR = "tags"
CACHE_DIR = "cache"
LATEST = "latest"
SPLITS = ("train", "val", "test", "all")
VERSION_PATTERN = re.compile(r"^[0-9a-f]{16}$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

class VersionError(DermaidError, ValueError):
    """A prepared dataset version, tag or split that does not exist or cannot be read."""


def read_manifest(version_url: str) -> dict[str, Any]:
    """The manifest.json of a prepared version directory."""
    url = join(version_url, MANIFEST_FILE)
    try:
        return json.loads(read_text(url))
    except FileNotFoundError:
        raise VersionError(f"{version_url}: not a prepared dataset version ({MANIFEST_FILE} missing)") from None
    except (OSError, ValueError) as exc:
        raise VersionError(f"{url}: could not be read ({type(exc).__name__}: {exc})") from None


def validate_tag(tag: str) -> str:
    """A tag is a short readable name that cannot be mistaken for a version hash or 'latest'."""
    tag = str(tag)
    if not TAG_PATTERN.match(tag) or VERSION_PATTERN.match(tag) or tag == LATEST:
        raise VersionError(f"invalid tag {tag!r}: use letters, digits, '.', '_', '-' (not 'latest', "
                           "not a 16-hex version id)")
    return tag


def write_tag(prepared_dir: str, tag: str, version: str) -> str | None:
    """Point `tag` at `version`; returns the version it pointed at before (None if new)."""
    url = join(prepared_dir, TAGS_DIR, validate_tag(tag))
    previous = read_text(url).strip() if exists(url) else None
    if previous != version:
        write_atomic(url, (version + "\n").encode())  # a reader sees the old or the new id, never an empty file
    return previous


def list_versions(prepared_dir: str) -> list[dict[str, Any]]:
    """Manifests of the complete versions under prepared_dir, oldest first."""
    fs, path = get_fs(prepared_dir)
    if not fs.exists(path):
        return []
    manifests = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not VERSION_PATTERN.match(name):
            continue  # tags/, cache/, *.tmp-* directories
        version_url = join(prepared_dir, name)
        if exists(join(version_url, MANIFEST_FILE)):
            manifests.append(read_manifest(version_url))
    return sorted(manifests, key=lambda m: (m.get("created", ""), m["version"]))


def resolve_version(prepared_dir: str, ref: str) -> str:
    """A version hash, a tag or "latest" -> the version directory URL (checked to exist)."""
    ref = str(ref).strip()
    if not ref:
        raise VersionError("empty dataset version; give a version id, a tag or 'latest'")
    if ref == LATEST:
        versions = list_versions(prepared_dir)
        if not versions:
            raise VersionError(f"{prepared_dir}: no prepared dataset versions yet (run `dermaid prepare`)")
        version = versions[-1]["version"]
    elif VERSION_PATTERN.match(ref):
        version = ref
    else:
        tag_url = join(prepared_dir, TAGS_DIR, ref)
        if not TAG_PATTERN.match(ref) or not exists(tag_url):
            raise VersionError(f"{prepared_dir}: no dataset version or tag named {ref!r}")
        version = read_text(tag_url).strip()
    url = join(absolute_url(prepared_dir), version)  # absolute: Ray workers may run in another directory
    if not exists(join(url, MANIFEST_FILE)):
        raise VersionError(f"{url}: dataset version {version} (from {ref!r}) has no {MANIFEST_FILE}")
    return url


def split_filter(split: str, fold: int, folds: int) -> list[tuple]:
    """pyarrow filter for a split of the fold column (train/val/test/all)."""
    if split not in SPLITS:
        raise VersionError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if split in ("train", "val") and not 0 <= int(fold) < int(folds):
        raise VersionError(f"validation fold {fold} is out of range: this version has folds 0..{folds - 1}")
    if split == "train":
        return [("fold", "!=", int(fold)), ("fold", "!=", -1)]
    if split == "val":
        return [("fold", "==", int(fold))]
    if split == "test":
        return [("fold", "==", -1)]
    return []


def load_records(version_url: str, split: str = "all", fold: int = 0, with_images: bool = True,
                 columns: list[str] | None = None) -> pd.DataFrame:
    """The rows of a split as a DataFrame (shard schema columns; `image` holds JPEG bytes)."""
    manifest = read_manifest(version_url)
    filters = split_filter(split, fold, manifest["settings"]["folds"])
    if columns is None:
        columns = [f.name for f in SHARD_SCHEMA if with_images or f.name != "image"]
    fs, _ = get_fs(version_url)
    frames = []
    for shard in manifest["shards"]:
        url = join(version_url, shard)
        _, path = get_fs(url)
        try:
            table = pq.read_table(path, filesystem=fs, columns=columns, filters=filters or None,
                                  schema=SHARD_SCHEMA)
        except (OSError, pa.ArrowException) as exc:
            raise VersionError(f"{url}: shard could not be read ({type(exc).__name__}: {exc})") from None
        frames.append(table)
    table = pa.concat_tables(frames) if frames else SHARD_SCHEMA.empty_table().select(columns)
    frame = table.to_pandas()
    frame = frame.sort_values("image_id", kind="stable").reset_index(drop=True) if "image_id" in frame else frame
    frame.attrs["version"] = manifest["version"]
    return frame
