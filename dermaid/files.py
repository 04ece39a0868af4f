"""fsspec helpers: every path in DermAID is a URL (local path, gs://bucket/prefix, memory://...).

Writes that must never be seen half-done go through `atomic_dir`: files land in a temporary
sibling and move into place at the end (a rename on local disk; on object stores the marker file
is written last, so readers that check for it never see a partial directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.core import url_to_fs


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


@contextlib.contextmanager
def atomic_dir(url: str, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary URL to fill; on success it becomes `url` (replacing it if overwrite).

    On a failure inside the block the temporary directory is removed and `url` is untouched.
    """
    fs, path = get_fs(url)
    path = path.rstrip("/")
    tmp_path = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    local = is_local(url)
    fs.makedirs(tmp_path, exist_ok=True)
    tmp_url = tmp_path if local else f"{_protocol(fs)}://{tmp_path}"
    try:
        yield tmp_url
    except BaseException:
        fs.rm(tmp_path, recursive=True)
        raise
    if fs.exists(path):
        if not overwrite:
            fs.rm(tmp_path, recursive=True)
            raise FileExistsError(f"{url} exists already")
        if local:
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        fs.rm(path, recursive=True)
    if local:
        os.replace(tmp_path, path)
    else:
        fs.mv(tmp_path, path, recursive=True)


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto
