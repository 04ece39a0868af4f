"""fsspec helpers: every path in DermAID is a URL (local path, gs://bucket/prefix, memory://...).

Publishing (how a directory becomes visible, `atomic_dir`): the files are written to a fresh sibling,
`<name>.tmp-<UTC stamp>-<id>`, that no reader looks at; one small step then makes them visible:
  - local disk: one rename(2) of the whole directory (a new name), or, replacing a directory, one
    renameat2(RENAME_EXCHANGE) that swaps the two names atomically (Linux; elsewhere two renames with a
    moment where the name is missing), then the old content is removed;
  - object stores (gs://, memory://): there is no directory rename. The files are copied into place one
    object at a time (each object appears whole: a PUT is atomic) with the marker files (card.json,
    manifest.json, ... `PUBLISH_MARKERS`) written LAST: readers go by the marker, so they never read a
    directory whose marker is missing. Replacing an existing directory (overwrite=True) takes one of two ways:
      * in place, never absent: when the new directory has one marker, at its top, and none of its other files
        has the name of a file of the old directory (a checkpoint replaced by `save_checkpoint`, whose weights
        get a fresh name, `versioned_name`: model-v<UTC stamp>-<id>.pt), the new files are copied beside the
        old ones, then the marker over the old marker (one PUT: readers see the old card, naming the old
        weights, or the new card, naming the new ones), then the old files the new directory lacks are
        removed. A reader that read the old card just before the switch and its weights just after the removal
        is told the checkpoint was replaced while it was read (card.load_state_dict): loading again gives the new;
      * otherwise (a file name shared by both, like ood_statistics.npz or part-0.txt, several markers): the old
        marker is deleted first (the directory reads as absent, never as a mix), then its files, then the new
        files are copied with the marker last; a crash in between loses the old version.
    What must never be absent is therefore never replaced that second way: registry versions and dataset
    versions are written once under fresh names, and what switches between them is a pointer file written
    last (`write_atomic`, `write_exclusive`: registry stages, dataset tags).
A crash leaves only garbage: a `*.tmp-*` directory; on object stores a directory without its marker, or, from an
in-place replacement, weights beside a valid card that does not name them (the new ones before the marker switch,
the old ones after it); `dermaid gc` (dermaid.registry.gc) names and removes them once older than a grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

TMP_INFIX = ".tmp-"   # fresh publish locations: <name>.tmp-<YYYYmmddTHHMMSSZ>-<hex8>; gc's pattern
TMP_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# files that say "this directory is complete": copied last into place on object stores, looked for by readers
PUBLISH_MARKERS = ("card.json", "manifest.json", "version.json", "registry.json", "summary.json", "report.html")
# fresh artifact name of an in-place replacement: <stem>-v<YYYYmmddTHHMMSSZ>-<hex8><suffixes>; gc looks for it
_VERSIONED_NAME = re.compile(r"^(?P<stem>[^/.]+)-v(?P<stamp>\d{8}T\d{6}Z)-[0-9a-f]{8}(?P<suffix>\.[^/]*)?$")


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL -> (filesystem, path inside it)."""
    return url_to_fs(str(url))


def absolute_url(url: str) -> str:
    """A local path made absolute ("~" expanded): Ray workers and Serve replicas run in other working
    directories. A URL with a protocol (gs://bucket/prefix, memory://, file:) loses trailing slashes only;
    "" stays ""."""
    url = str(url)
    if not url:
        return url
    if "://" in url or url.startswith("file:"):
        stripped = url.rstrip("/")
        return url if stripped.endswith(":") else stripped
    return os.path.abspath(os.path.expanduser(url))


def is_local(url: str) -> bool:
    fs, _ = get_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    url = str(url).rstrip("/")
    return "/".join([url, *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    fs, path = get_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


# --------------------------------------------------------------------------- single files: pointers

def write_atomic(url: str, data: bytes) -> None:
    """Replace one small file so that readers see the old or the new content, never a part: on local disk a
    temporary sibling then os.replace; on object stores one PUT (an object appears whole when it is closed)."""
    _write_whole(url, data, "wb", os.replace)  # os.replace: atomic on one filesystem


def write_exclusive(url: str, data: bytes) -> None:
    """Create a file that must not exist yet, whole or not at all: the compare-and-swap of pointers.

    FileExistsError when it exists (someone else created it first). Local disk: the content goes to a
    temporary file, then os.link puts it under the final name, and link(2) fails with EEXIST when the name is
    taken (O_EXCL alone would expose a half-written file to readers). Object stores: open(mode="xb"), which
    gcsfs sends as a conditional PUT (ifGenerationMatch=0) and memory:// checks under its lock; a store
    without "xb" raises ValueError (no silent fallback to a racy check-then-write)."""
    _write_whole(url, data, "xb", os.link)  # os.link: EEXIST -> FileExistsError


def _write_whole(url: str, data: bytes, store_mode: str, publish: Any) -> None:
    """One small file, never seen half-written. Object stores: one PUT opened with `store_mode` ("wb", or "xb":
    only if absent). Local disk: `data` written whole (fsynced) to a temporary sibling, then `publish(tmp, path)`
    (os.replace or os.link); the temporary name is gone afterwards either way."""
    fs, path = get_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not is_local(url):
        with fs.open(path, store_mode) as f:
            f.write(data)
        return
    tmp = f"{path}{TMP_INFIX}{_stamp()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------- directories: publishing

def tmp_sibling(url: str) -> str:
    """A fresh publish location beside `url` (same filesystem, so a local rename works)."""
    return f"{str(url).rstrip('/')}{TMP_INFIX}{_stamp()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_dir(url: str, overwrite: bool = True, markers: tuple[str, ...] = PUBLISH_MARKERS) -> Iterator[str]:
    """Yield a fresh temporary URL to fill; on success it is published at `url` (see the module docstring).

    overwrite=False: FileExistsError when `url` exists (checked before and, on local disk, by the rename
    itself: a directory published by someone else meanwhile is never replaced). On a failure inside the
    block the temporary directory is removed and `url` is untouched; a crash leaves the `*.tmp-*` directory
    for `dermaid gc`."""
    fs, path = get_fs(url)
    path = path.rstrip("/")
    local = is_local(url)
    if not overwrite and fs.exists(path):
        raise FileExistsError(f"{url} exists already")
    tmp_path = tmp_sibling(path)
    fs.makedirs(tmp_path, exist_ok=True)
    tmp_url = tmp_path if local else f"{_protocol(fs)}://{tmp_path}"
    try:
        yield tmp_url
        publish(tmp_url, url, overwrite, markers)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp_path, recursive=True)
        raise
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(tmp_path):
            fs.rm(tmp_path, recursive=True)


def publish(tmp_url: str, url: str, overwrite: bool = True, markers: tuple[str, ...] = PUBLISH_MARKERS) -> None:
    """Make the filled directory `tmp_url` (a `tmp_sibling` of `url`) visible as `url` in one step: a rename on
    local disk, a marker-last copy on object stores (module docstring). FileExistsError when `url` exists and
    not overwrite. `tmp_url` is gone afterwards on local disk; on object stores the caller removes it."""
    fs, tmp_path = get_fs(tmp_url)
    path = get_fs(url)[1].rstrip("/")
    if is_local(url):
        _publish_local(tmp_path.rstrip("/"), path, overwrite)
    else:
        _publish_by_copy(fs, tmp_path.rstrip("/"), path, overwrite, markers)


def _publish_local(tmp: str, path: str, overwrite: bool) -> None:
    """One rename makes `tmp` visible as `path` (exchanging the two when `path` exists and overwrite)."""
    if not os.path.lexists(path):
        try:
            _renameat2(tmp, path, _RENAME_NOREPLACE)
            return
        except FileExistsError:
            if not overwrite:
                raise FileExistsError(f"{path} exists already (published meanwhile)") from None
        except _Unsupported:
            if not os.path.lexists(path):
                os.rename(tmp, path)
                return
    if not overwrite:
        raise FileExistsError(f"{path} exists already")
    try:
        _renameat2(tmp, path, _RENAME_EXCHANGE)  # tmp now holds the old content
        shutil.rmtree(tmp, ignore_errors=True)
        return
    except _Unsupported:
        pass
    old = tmp_sibling(path)  # no exchange here: path is missing between these two renames
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _publish_by_copy(fs: fsspec.AbstractFileSystem, tmp: str, path: str, overwrite: bool,
                     markers: tuple[str, ...]) -> None:
    """Object stores: copy tmp's objects into `path`, marker files last. An existing `path` is replaced in place
    when `_in_place` allows (old files the new directory lacks are removed after the marker switch); otherwise it
    loses its markers first, then its other files (read as absent meanwhile, never as a mix of old and new)."""
    sources = sorted(p for p in fs.find(tmp, detail=False) if not fs.isdir(p))
    rel = [p[len(tmp):].lstrip("/") for p in sources]
    is_marker = [r.rsplit("/", 1)[-1] in markers for r in rel]
    stale: list[str] = []  # the old directory's files to remove once the new marker is in place
    if fs.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists already")
        old = {p[len(path):].lstrip("/"): p for p in sorted(fs.find(path, detail=False)) if not fs.isdir(p)}
        if _in_place(rel, is_marker, old, markers):
            kept = set(rel)
            stale = [p for r, p in old.items() if r not in kept]
        else:
            old_markers = [p for r, p in old.items() if r.rsplit("/", 1)[-1] in markers]
            for p in old_markers:
                fs.rm_file(p)
            for p in old.values():
                if p not in old_markers:
                    fs.rm_file(p)
    marker_order = sorted((i for i in range(len(rel)) if is_marker[i]), key=lambda i: (-rel[i].count("/"), rel[i]))
    order = [i for i in range(len(rel)) if not is_marker[i]] + marker_order  # a top-level marker is the very last
    for i in order:
        target = f"{path}/{rel[i]}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores; local-like stores need it
        fs.copy(sources[i], target)
    for p in stale:  # nothing the new marker names: the old weights (a crash here leaves them for gc)
        fs.rm_file(p)


def _in_place(rel: list[str], is_marker: list[bool], old: dict[str, str], markers: tuple[str, ...]) -> bool:
    """Whether the new files (`rel`, paths inside the directory) can be copied beside the `old` ones (relative
    path -> full path) and switched by one marker: exactly one new marker, at the top, the old directory's markers
    at most that one, and no other new file overwriting an old one (which readers of the old marker might read)."""
    new_markers = [r for r, m in zip(rel, is_marker) if m]
    if len(new_markers) != 1 or "/" in new_markers[0]:
        return False
    if any(r.rsplit("/", 1)[-1] in markers and r != new_markers[0] for r in old):
        return False
    return not any(r in old for r, m in zip(rel, is_marker) if not m)


def versioned_name(name: str) -> str:
    """A fresh name for a file replacing `name` in place (`_in_place`): model.pt -> model-v<UTC stamp>-<hex8>.pt,
    model.int8.onnx -> model-v<...>-<hex8>.int8.onnx; a versioned name gets a new version, not a second one."""
    stem, dot, suffix = unversioned_name(name).partition(".")
    return f"{stem}-v{_stamp()}-{uuid.uuid4().hex[:8]}{dot}{suffix}"


def unversioned_name(name: str) -> str:
    """The name `versioned_name` started from (model-v...-ab12cd34.pt -> model.pt); other names unchanged."""
    match = _VERSIONED_NAME.match(name)
    return f"{match['stem']}{match['suffix'] or ''}" if match else name


def is_versioned_name(name: str) -> bool:
    return _VERSIONED_NAME.match(name) is not None


def versioned_age_seconds(name: str, now: _dt.datetime | None = None) -> float | None:
    """Age of a `versioned_name` from its stamp; None for another name."""
    match = _VERSIONED_NAME.match(name)
    return _stamp_age(match["stamp"], now) if match else None


class _Unsupported(OSError):
    """renameat2 or the flag is not available here (not Linux, old glibc, a filesystem without it)."""


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: str, dst: str, flags: int) -> None:
    """Linux renameat2(2) through ctypes: Python's os module has rename/replace only, and the one PyPI wrapper
    (renameat2 0.4, 2022) is unmaintained; this is one libc call."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise _Unsupported("renameat2 is not available") from None
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise _Unsupported(os.strerror(err))
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), dst)
    raise OSError(err, os.strerror(err), f"{src} -> {dst}")


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime(TMP_STAMP_FORMAT)


def tmp_age_seconds(name: str, now: _dt.datetime | None = None) -> float | None:
    """Age of a publish location from the stamp in its name (`x.tmp-20261129T200000Z-ab12cd34`); None for a
    name without one (older `x.tmp-ab12cd34` names: gc then goes by the modification time)."""
    _, _, tail = name.rpartition(TMP_INFIX)
    return _stamp_age(tail.split("-", 1)[0], now)


def _stamp_age(stamp: str, now: _dt.datetime | None) -> float | None:
    try:
        when = _dt.datetime.strptime(stamp, TMP_STAMP_FORMAT).replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return None
    return ((now or _dt.datetime.now(_dt.timezone.utc)) - when).total_seconds()


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto
