"""Download the official ISIC 2019 training data and unpack it into the ISIC 2019 layout at any URL.

    dermaid download dataset=isic2019 out=data/isic2019
    dermaid download dataset=isic2019 out=gs://my-bucket/isic2019 staging_dir=/mnt/scratch

    from dermaid.data.download import download_files
    download_files(files, out="data/isic2019", staging_dir="data/downloads")

Each file streams over HTTP(S) into a local staging file `<name>.part` with progress, resuming
an interrupted transfer with an HTTP Range request (retried up to `retries` times), then is
checked against its size (configured, else the server's) and its sha256 where one is known.
Archives are unpacked, CSVs copied, into a temporary directory beside `out` and moved into
place only when complete; `out/download.json` records what is done, so a re-run skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import sys
import time
import uuid
import zipfile
from typing import Any

import requests
from omegaconf import DictConfig

from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, is_local, join, read_text, write_text

log = logging.getLogger(__name__)

MARKER_FILE = "download.json"
CHUNK_BYTES = 1 << 16  # 64 KiB reads: at most this much is lost (and re-fetched) when a connection drops


class DownloadError(DermaidError, OSError):
    """A download that failed, was cut short too often, or does not match its size/checksum."""


# ---------------------------------------------------------------------------------------------
# Public API


def download_files(files: list[dict[str, Any]], out: str, staging_dir: str, *, retries: int = 5,
                   timeout_s: float = 60.0, keep_archives: bool = False) -> dict[str, Any]:
    """Fetch, verify and unpack `files` ({name, url, size, sha256, extract}) into `out`; returns the marker."""
    os.makedirs(staging_dir, exist_ok=True)
    marker = _read_marker(out)
    for spec in files:
        name = spec["name"]
        if name in marker["files"]:
            log.info("download: %s is already in %s; skipping", name, out)
            continue
        local = fetch(spec["url"], os.path.join(staging_dir, name), size=spec.get("size"),
                      sha256=spec.get("sha256"), retries=retries, timeout_s=timeout_s)
        digest = _sha256_file(local)
        if spec.get("extract"):
            members = extract_zip(local, out)
        else:
            _copy_into(local, out, name)
            members = [name]
        marker["files"][name] = {"url": spec["url"], "size": os.path.getsize(local), "sha256": digest,
                                 "entries": len(members)}
        write_text(join(out, MARKER_FILE), json.dumps(marker, indent=2))
        if not keep_archives:
            os.remove(local)
        log.info("download: %s done (%d entries) -> %s", name, len(members), out)
    return marker


def fetch(url: str, dest: str, size: int | None = None, sha256: str | None = None, *, retries: int = 5,
          timeout_s: float = 60.0) -> str:
    """Download url to the local file dest, resuming dest + '.part'; verify size and checksum."""
    if os.path.exists(dest) and _verified(dest, size, sha256):
        return dest
    part = dest + ".part"
    expected = size
    attempts = 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if expected is not None and have == expected:
            break
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as resp:
                if resp.status_code == 416 and have:  # nothing left to send: the part is complete
                    expected = expected if expected is not None else have
                    break
                if resp.status_code not in (200, 206):
                    raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                total = _total_size(resp, have)
                if expected is None:
                    expected = total
                elif total is not None and total != expected:
                    raise DownloadError(f"{url}: the server has {total} bytes, the config expects {expected}")
                mode = "ab" if resp.status_code == 206 else "wb"  # 200: the server ignored Range; start over
                if mode == "wb" and have:
                    log.info("download: %s does not support resuming; starting over", url)
                _stream(resp, part, mode, expected, url)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            attempts += 1
            if attempts > retries:
                raise DownloadError(f"{url}: failed after {retries} retries ({type(exc).__name__}: {exc}); "
                                    f"run again to resume from {part}") from None
            log.warning("download: %s interrupted at %d bytes (%s); resuming (%d/%d)", url,
                        os.path.getsize(part) if os.path.exists(part) else 0, type(exc).__name__, attempts, retries)
            time.sleep(min(2.0 ** (attempts - 1) * 0.1, 10.0))
            continue
        have = os.path.getsize(part)
        if expected is None or have >= expected:
            break
        attempts += 1  # the body ended early without an error
        if attempts > retries:
            raise DownloadError(f"{url}: got {have} of {expected} bytes after {retries} retries")
    have = os.path.getsize(part)
    if expected is not None and have != expected:
        os.remove(part)
        raise DownloadError(f"{url}: size mismatch: got {have} bytes, expected {expected}; the partial file was removed")
    if sha256:
        digest = _sha256_file(part)
        if digest != sha256.lower():
            os.remove(part)
            raise DownloadError(f"{url}: sha256 mismatch: got {digest}, expected {sha256}; the file was removed")
    os.replace(part, dest)
    return dest


def extract_zip(archive: str, out: str) -> list[str]:
    """Unpack a zip into out (any fsspec URL) through a temporary sibling; returns the member names."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive}: not a valid zip archive ({exc})") from None
    with zf:
        names = [m.filename for m in zf.infolist() if not m.is_dir()]
        bad = [n for n in names if n.startswith("/") or ".." in n.split("/") or "\\" in n]
        if bad:
            raise DownloadError(f"{archive}: refusing unsafe member path(s) {bad[:5]}")
        if not names:
            raise DownloadError(f"{archive}: the archive is empty")
        tops = sorted({n.split("/", 1)[0] for n in names})
        fs, out_path = get_fs(out)
        tmp_path = f"{out_path.rstrip('/')}/.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for i, name in enumerate(names):
                target = f"{tmp_path}/{name}"
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                with zf.open(name) as src, fs.open(target, "wb") as dst:
                    while chunk := src.read(CHUNK_BYTES):
                        dst.write(chunk)
                if (i + 1) % 5000 == 0:
                    log.info("download: extracted %d/%d files", i + 1, len(names))
            for top in tops:
                _move(fs, f"{tmp_path}/{top}", f"{out_path.rstrip('/')}/{top}", is_local(out))
        finally:
            if fs.exists(tmp_path):
                fs.rm(tmp_path, recursive=True)
    return names


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid download dataset=isic2019 out=URL`."""
    datasets = to_plain(cfg.datasets)
    if cfg.dataset not in datasets:
        raise DermaidError(f"unknown dataset {cfg.dataset!r}; known: {sorted(datasets)}")
    spec = datasets[cfg.dataset]
    print(spec["terms"])
    marker = download_files(spec["files"], out=str(cfg.out), staging_dir=str(cfg.staging_dir),
                            retries=int(cfg.retries), timeout_s=float(cfg.timeout_s),
                            keep_archives=bool(cfg.keep_archives))
    print(f"{cfg.dataset}: {', '.join(marker['files'])} at {cfg.out}")
    return marker


# ---------------------------------------------------------------------------------------------
# Helpers


def _total_size(resp: requests.Response, have: int) -> int | None:
    if resp.status_code == 206:
        content_range = resp.headers.get("Content-Range", "")  # bytes 100-999/1000
        if "/" in content_range and not content_range.endswith("/*"):
            return int(content_range.rsplit("/", 1)[1])
        length = resp.headers.get("Content-Length")
        return have + int(length) if length else None
    length = resp.headers.get("Content-Length")
    return int(length) if length else None


def _stream(resp: requests.Response, part: str, mode: str, expected: int | None, url: str) -> None:
    done = os.path.getsize(part) if (mode == "ab" and os.path.exists(part)) else 0
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=expected, initial=done, unit="B", unit_scale=True, desc=posixpath.basename(url))
    next_log, start = 0.0, time.perf_counter()
    try:
        with open(part, mode) as f:
            for chunk in resp.iter_content(CHUNK_BYTES):
                f.write(chunk)
                done += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                elif time.perf_counter() - start >= next_log:
                    pct = f" ({100 * done / expected:.0f}%)" if expected else ""
                    log.info("download: %s %d bytes%s", posixpath.basename(url), done, pct)
                    next_log += 10.0
    finally:
        if bar is not None:
            bar.close()


def _verified(path: str, size: int | None, sha256: str | None) -> bool:
    if size is not None and os.path.getsize(path) != size:
        return False
    return not sha256 or _sha256_file(path) == sha256.lower()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES * 64):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(out: str) -> dict[str, Any]:
    url = join(out, MARKER_FILE)
    if exists(url):
        try:
            return json.loads(read_text(url))
        except ValueError:
            pass
    return {"files": {}}


def _copy_into(local: str, out: str, name: str) -> None:
    """Copy a local file to out/name through a temporary name, so a partial copy is never seen."""
    fs, out_path = get_fs(out)
    fs.makedirs(out_path, exist_ok=True)
    tmp = f"{out_path.rstrip('/')}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    fs.put_file(local, tmp)
    fs.mv(tmp, f"{out_path.rstrip('/')}/{name}")


def _move(fs, src: str, dst: str, local: bool) -> None:
    if fs.exists(dst):
        fs.rm(dst, recursive=True)  # a previous incomplete unpack (its marker entry is missing)
    if local:
        os.replace(src, dst)
    else:
        fs.mv(src, dst, recursive=True)
