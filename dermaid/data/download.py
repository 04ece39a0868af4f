"""Download the official ISIC 2019 training data and unpack it into the ISIC 2019 layout at any URL.

    dermaid download dataset=isic2019 out=data/isic2019
    dermaid download dataset=isic2019 out=gs://my-bucket/isic2019 staging_dir=/mnt/scratch

    from dermaid.data.download import download_files
    download_files(files, out="data/isic2019", staging_dir="data/downloads")

Each file streams over HTTP(S) into a local staging file `<name>.part`, then is checked against its size
(configured, else the server's) and its sha256 where one is known. What survives a 9 GB archive:

- Retries with exponential backoff (`backoff_s`, doubling up to `backoff_max_s`) after a timeout, a dropped
  connection, a body cut short, HTTP 429 or a 5xx; a 429/503 with Retry-After waits what the server asks
  (up to `retry_after_max_s`). `retries` counts failed attempts in a row: an attempt that brought new bytes
  starts the count again, so a long transfer over a flaky link is not cut off by its total number of drops.
- Resuming only the same version of the file: the first response's validator (a strong ETag, else
  Last-Modified) is kept beside the partial file (`<name>.part.json`, so a later run resumes too), and a
  resume sends Range with If-Range: a server whose file changed answers with the whole new file, and the
  download starts over and says so. A partial file without a validator to prove it is never resumed
  (started over, with a warning); a 206 whose validator differs from the first (a server that ignores
  If-Range) is refused the same way.
- Archives are unpacked, CSVs copied, into a temporary directory beside `out` and moved into place only
  when complete; `out/download.json` (the output's manifest) records each file's URL, size, sha256 and
  validator, so a re-run skips what is done.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import posixpath
import sys
import time
import uuid
import zipfile
from datetime import datetime, timezone
from typing import Any

import requests
from omegaconf import DictConfig

from dermaid.config import to_plain
from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, is_local, join, read_text, write_text

log = logging.getLogger(__name__)

MARKER_FILE = "download.json"
CHUNK_BYTES = 1 << 16  # 64 KiB reads: at most this much is lost (and re-fetched) when a connection drops
# worth another try: throttling and server-side trouble; 501 (not implemented) and 505 (version) will not change
RETRY_STATUSES = frozenset({429} | set(range(500, 600)) - {501, 505})
_sleep = time.sleep  # the waits between attempts (tests record them instead of waiting)


class DownloadError(DermaidError, OSError):
    """A download that failed, was cut short too often, or does not match its size/checksum."""


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; `wait`: the server's Retry-After in seconds, if it sent one."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


# ---------------------------------------------------------------------------------------------
# Public API


def download_files(files: list[dict[str, Any]], out: str, staging_dir: str, *, retries: int = 5,
                   timeout_s: float = 60.0, keep_archives: bool = False, backoff_s: float = 1.0,
                   backoff_max_s: float = 60.0, retry_after_max_s: float = 600.0) -> dict[str, Any]:
    """Fetch, verify and unpack `files` ({name, url, size, sha256, extract}) into `out`; returns the marker."""
    os.makedirs(staging_dir, exist_ok=True)
    marker = _read_marker(out)
    for spec in files:
        name = spec["name"]
        if name in marker["files"]:
            log.info("download: %s is already in %s; skipping", name, out)
            continue
        fetched = fetch(spec["url"], os.path.join(staging_dir, name), size=spec.get("size"),
                        sha256=spec.get("sha256"), retries=retries, timeout_s=timeout_s, backoff_s=backoff_s,
                        backoff_max_s=backoff_max_s, retry_after_max_s=retry_after_max_s)
        local = fetched["path"]
        if spec.get("extract"):
            members = extract_zip(local, out)
        else:
            _copy_into(local, out, name)
            members = [name]
        marker["files"][name] = {"url": spec["url"], "size": fetched["size"], "sha256": fetched["sha256"],
                                 "etag": fetched["etag"], "last_modified": fetched["last_modified"],
                                 "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "entries": len(members)}
        write_text(join(out, MARKER_FILE), json.dumps(marker, indent=2))
        if not keep_archives:
            os.remove(local)
        log.info("download: %s done (%d bytes, sha256 %s, %d entries) -> %s", name, fetched["size"],
                 fetched["sha256"], len(members), out)
    return marker


def fetch(url: str, dest: str, size: int | None = None, sha256: str | None = None, *, retries: int = 5,
          timeout_s: float = 60.0, backoff_s: float = 1.0, backoff_max_s: float = 60.0,
          retry_after_max_s: float = 600.0) -> dict[str, Any]:
    """Download url to the local file dest through dest + '.part' (resumed only while the server's
    validator matches); verify size and checksum. Returns {"path", "size", "sha256", "etag", "last_modified"}.

    A hand-written retry loop rather than urllib3's Retry: that one retries a request before its body
    arrives, silently, while most of what goes wrong with a 9 GB body happens in the middle of it, where
    the next attempt has to resume (or refuse to) against the validator first seen.
    """
    if os.path.exists(dest) and _verified(dest, size, sha256):
        return {"path": dest, "size": os.path.getsize(dest), "sha256": _sha256_file(dest), "etag": None,
                "last_modified": None}
    part, state_file = dest + ".part", dest + ".part.json"
    state = _read_state(state_file, url)  # the validator and size of the version `part` holds
    failures = restarts = 0
    with requests.Session() as session:
        while True:
            have = _part_size(part)
            if have and not (state.get("etag") or state.get("last_modified")):
                log.warning("download: %s: %d bytes from an earlier attempt, but the server gave no ETag or "
                            "Last-Modified to prove they belong to the same file; starting over", url, have)
                _discard(part, state_file)
                state, have = {}, 0
            if have and state.get("total") is not None and have >= state["total"]:
                break  # an earlier attempt finished the body
            progress = {"bytes": 0, "restarted": False}  # what this attempt wrote; whether it began again at 0
            try:
                _attempt(session, url, part, state_file, state, have, size, timeout_s, progress)  # a 200 updates `state`
            except _Changed as exc:
                log.warning("download: %s %s; starting over", url, exc)
                restarts = _count_restart(url, restarts, retries)
                state = exc.state
                continue
            except (_Retryable, requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                reason, wait = _describe_failure(exc)
            else:
                wait = None
                done = _part_size(part)
                if state.get("total") is None or done >= state["total"]:
                    break
                reason = f"the body ended after {done} of {state['total']} bytes"
            if progress["restarted"]:
                restarts = _count_restart(url, restarts, retries)
            failures = 1 if progress["bytes"] else failures + 1  # failed attempts in a row without new bytes
            if failures > retries:
                raise DownloadError(f"{url}: failed after {retries} retries ({reason}); run again to resume from "
                                    f"{part}") from None
            if wait is not None and wait > retry_after_max_s:
                raise DownloadError(f"{url}: the server asks to wait {wait:.0f} s (Retry-After), more than "
                                    f"retry_after_max_s={retry_after_max_s:g}; run again later") from None
            # deterministic doubling: one client fetching files one after another has no herd to spread out
            delay = wait if wait is not None else min(backoff_max_s, backoff_s * 2 ** (failures - 1))
            log.warning("download: %s: %s at %d bytes; retrying in %.1f s (%d/%d)", url, reason, _part_size(part),
                        delay, failures, retries)
            _sleep(delay)
    return _finish(url, part, state_file, dest, size, sha256, state)


def _count_restart(url: str, restarts: int, retries: int) -> int:
    """One more start from byte 0 after bytes were kept; a DownloadError past `retries` (no endless loop)."""
    restarts += 1
    if restarts > retries:
        raise DownloadError(f"{url}: started over {restarts} times (the file keeps changing on the server, or it "
                            "ignores Range requests while dropping connections); try again later") from None
    return restarts


class _Changed(Exception):
    """The server's file is not the one the partial file came from; `state`: the new version's, if it was sent."""

    def __init__(self, reason: str, state: dict[str, Any]) -> None:
        super().__init__(reason)
        self.state = state


def _attempt(session: requests.Session, url: str, part: str, state_file: str, state: dict[str, Any], have: int,
             size: int | None, timeout_s: float, progress: dict[str, Any]) -> None:
    """One GET: resume `part` (Range + If-Range) or write it from the start; raises _Retryable, _Changed or
    DownloadError, or returns when the body ended (complete or not: the caller checks the size)."""
    headers = {"Accept-Encoding": "identity"}  # ranges count the bytes as sent: no transparent gzip in between
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": state.get("etag") or state["last_modified"]})
    with session.get(url, headers=headers, stream=True, timeout=timeout_s) as resp:
        if resp.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {resp.status_code} {resp.reason}", _retry_after(resp))
        if resp.status_code == 416 and have:  # nothing left after `have`: complete if the sizes agree
            total = _content_range_total(resp)
            if total is not None and total == have == state.get("total"):
                return
            _discard(part, state_file)
            raise _Changed(f"answered 416 for bytes {have}- (its size is {total}, the partial file's "
                           f"{state.get('total')})", {})
        if resp.status_code not in (200, 206):
            raise DownloadError(f"{url}: HTTP {resp.status_code} {resp.reason}")
        seen = _validators(resp)
        if resp.status_code == 206:
            if not have:
                raise DownloadError(f"{url}: HTTP 206 for a request without Range")
            differs = [k for k in ("etag", "last_modified") if state.get(k) and seen.get(k) and seen[k] != state[k]]
            start = _content_range_start(resp)
            if differs or start != have:
                _discard(part, state_file)
                why = (f"changed on the server ({differs[0]} {state[differs[0]]} -> {seen[differs[0]]})" if differs
                       else f"resumed at byte {start}, not {have}")
                raise _Changed(why, {})
            mode, total = "ab", _total_size(resp, have)
        else:  # 200: the whole file, the first time or because If-Range no longer matched
            now = seen.get("etag") or seen.get("last_modified")
            then = state.get("etag") or state.get("last_modified")
            if have and now != then:
                log.warning("download: %s changed on the server since the first %d bytes (validator %s, now %s); "
                            "starting over", url, have, then, now)
            elif have:
                log.warning("download: %s: the server ignored the Range request; starting over", url)
            progress["restarted"] = bool(have)
            mode, total = "wb", _total_size(resp, 0)
            state.clear()
            state.update(url=url, total=total, **seen)
            _write_state(state_file, state)
        if size is not None and total is not None and total != size:
            raise DownloadError(f"{url}: the server has {total} bytes, the config expects {size}")
        _stream(resp, part, mode, total, url, progress)


def _finish(url: str, part: str, state_file: str, dest: str, size: int | None, sha256: str | None,
            state: dict[str, Any]) -> dict[str, Any]:
    """Check the complete partial file's size and checksum, then move it to dest."""
    have = _part_size(part)
    expected = size if size is not None else state.get("total")
    if expected is not None and have != expected:
        _discard(part, state_file)
        raise DownloadError(f"{url}: size mismatch: got {have} bytes, expected {expected}; the partial file was removed")
    digest = _sha256_file(part)
    if sha256 and digest != sha256.lower():
        _discard(part, state_file)
        raise DownloadError(f"{url}: sha256 mismatch: got {digest}, expected {sha256}; the file was removed")
    os.replace(part, dest)
    if os.path.exists(state_file):
        os.remove(state_file)
    return {"path": dest, "size": have, "sha256": digest, "etag": state.get("etag"),
            "last_modified": state.get("last_modified")}


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
                            keep_archives=bool(cfg.keep_archives), backoff_s=float(cfg.backoff_s),
                            backoff_max_s=float(cfg.backoff_max_s), retry_after_max_s=float(cfg.retry_after_max_s))
    for name, entry in marker["files"].items():
        print(f"{name}: {entry['size']} bytes, sha256 {entry['sha256']}")
    print(f"{cfg.dataset}: {', '.join(marker['files'])} at {cfg.out} (manifest: {join(str(cfg.out), MARKER_FILE)})")
    return marker


# ---------------------------------------------------------------------------------------------
# Helpers


def _validators(resp: requests.Response) -> dict[str, str | None]:
    """The response's validators usable in If-Range: a strong ETag (a weak W/ one may not be), Last-Modified."""
    etag = resp.headers.get("ETag")
    return {"etag": etag if etag and not etag.startswith("W/") else None,
            "last_modified": resp.headers.get("Last-Modified")}


def _retry_after(resp: requests.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = (resp.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _describe_failure(exc: BaseException) -> tuple[str, float | None]:
    """(what went wrong, the server's Retry-After or None)."""
    if isinstance(exc, _Retryable):
        return str(exc), exc.wait
    if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():  # a read timeout mid-body too
        return f"timed out ({type(exc).__name__})", None
    return f"connection dropped ({type(exc).__name__})", None


def _content_range_start(resp: requests.Response) -> int | None:
    content_range = resp.headers.get("Content-Range", "")  # bytes 100-999/1000
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(resp: requests.Response) -> int | None:
    content_range = resp.headers.get("Content-Range", "")  # bytes */1000 on a 416
    tail = content_range.rsplit("/", 1)[-1] if "/" in content_range else ""
    return int(tail) if tail.isdigit() else None


def _part_size(part: str) -> int:
    return os.path.getsize(part) if os.path.exists(part) else 0


def _read_state(state_file: str, url: str) -> dict[str, Any]:
    """The partial file's version ({url, total, etag, last_modified}); {} when absent, unreadable or another URL's."""
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("url") == url else {}


def _write_state(state_file: str, state: dict[str, Any]) -> None:
    tmp = f"{state_file}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, state_file)


def _discard(part: str, state_file: str) -> None:
    for path in (part, state_file):
        if os.path.exists(path):
            os.remove(path)


def _total_size(resp: requests.Response, have: int) -> int | None:
    if resp.status_code == 206:
        content_range = resp.headers.get("Content-Range", "")  # bytes 100-999/1000
        if "/" in content_range and not content_range.endswith("/*"):
            return int(content_range.rsplit("/", 1)[1])
        length = resp.headers.get("Content-Length")
        return have + int(length) if length else None
    length = resp.headers.get("Content-Length")
    return int(length) if length else None


def _stream(resp: requests.Response, part: str, mode: str, expected: int | None, url: str,
            progress: dict[str, Any]) -> None:
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
                progress["bytes"] += len(chunk)
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
