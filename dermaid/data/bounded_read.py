"""Reading untrusted files under a size limit: one file, or a Ray Data batch of them with a reason per file.

    data = read_limited(url, size, max_bytes)        # DermaidError: over the limit (unread), or unreadable
    batch = read_batch({"index": ..., "url": ..., "size": ...}, max_bytes)   # + "data" (bytes), "error" ("" = read)

`dermaid predict`'s read tasks run read_batch (dermaid.inference.batch). It lives outside dermaid.inference so a
Ray Data read worker imports fsspec and numpy only, not torch and timm (~0.5 GB per worker otherwise).
"""

from __future__ import annotations

import numpy as np

from dermaid.errors import DermaidError
from dermaid.files import read_bytes

MIB = 1024 * 1024


def read_limited(url: str, size: int | None, max_bytes: int) -> bytes:
    """A file's bytes under the limit (checked on the listed size before reading, and on what was read); a
    DermaidError with the reason otherwise."""
    if size is not None and size > max_bytes:
        raise DermaidError(f"file is {size / MIB:.1f} MiB; the limit is {max_bytes / MIB:g} MiB (max_upload_mb)")
    try:
        data = read_bytes(url)
    except Exception as exc:  # noqa: BLE001 - local and remote filesystems raise their own types
        raise DermaidError(f"could not be read ({type(exc).__name__}: {exc})") from None
    if len(data) > max_bytes:
        raise DermaidError(f"file is {len(data) / MIB:.1f} MiB; the limit is {max_bytes / MIB:g} MiB (max_upload_mb)")
    return data


def read_batch(batch: dict[str, np.ndarray], max_bytes: int) -> dict[str, np.ndarray]:
    """A read task: urls (size -1: not listed) -> bytes, or the reason a file could not be read. Not
    ray.data.read_binary_files: there one unreadable file fails the whole dataset, and a file of any size is read;
    here each file's failure is its own row's reason and the size limit is checked before reading."""
    datas, errors = [], []
    for url, size in zip(batch["url"], batch["size"]):
        try:
            datas.append(read_limited(str(url), None if size < 0 else int(size), max_bytes))
            errors.append("")
        except DermaidError as exc:
            datas.append(b"")
            errors.append(str(exc))
    return {"index": batch["index"], "url": batch["url"], "data": np.array(datas, dtype=object),
            "error": np.array(errors, dtype=object)}
