"""The per-shard work of `dermaid prepare`, run inside Ray workers: read, decode, resize, encode, write.

Kept apart from dermaid.data.prepare so a worker imports only numpy, PIL and pyarrow (no pandas,
no Hydra): a fresh worker is ready sooner, which matters on small sets and on autoscaled nodes.
Also the shard schema (docs/interfaces.md), shared with dermaid.data.loading, and the card's
`preparation` block (preparation_block): what process_image did to the images a model was trained and
evaluated on, so dermaid.inference.Predictor can run process_image itself on an upload.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dermaid.classes import CLASS_INDEX, is_missing
from dermaid.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, open_image, resize_shorter_side
from dermaid.files import get_fs

# Parquet schema of the shards (docs/interfaces.md).
SHARD_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.string()),
    ("label_idx", pa.int32()),
    ("age", pa.float64()),
    ("sex", pa.string()),
    ("site", pa.string()),
    ("lesion_id", pa.string()),
    ("source", pa.string()),
    ("fold", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
_COMPRESSION = {f.name: ("NONE" if f.name == "image" else "SNAPPY") for f in SHARD_SCHEMA}  # JPEG won't shrink

# process_image's fixed rule, named in every card's `preparation` block; change it together with process_image
# (a card naming another rule is refused by the Predictor rather than served with different pixels).
PREPARATION_RULE = {
    "decode": "open_image, JPEG draft at image_size",
    "resize": "shorter side to image_size, bicubic, never upsampled",
    "format": "JPEG",
}


def process_image(data: bytes, image_size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, int, int]:
    """Raw image bytes -> (JPEG bytes with shorter side image_size, width, height)."""
    img = resize_shorter_side(open_image(data, max_pixels=max_pixels, draft_size=image_size), image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.width, img.height


def preparation_block(settings: dict[str, Any]) -> dict[str, Any]:
    """The model card's `preparation` block for images prepared with a version's settings (its manifest's)."""
    return {**PREPARATION_RULE, "image_size": int(settings["image_size"]), "quality": int(settings["quality"])}


def prepare_shard(rows: list[dict[str, Any]], shard_url: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Decode, resize and encode `rows`, write them as one Parquet shard (only if all succeed).

    Returns {"images": [(image_id, raw sha256, width, height)], "errors": [(image_url, message)], "bytes": n}.
    """
    columns: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    images, errors, total = [], [], 0
    for row in rows:
        url = row["image_url"]
        try:
            fs, path = get_fs(url)
            data = fs.cat_file(path)
        except (OSError, ValueError) as exc:
            errors.append((url, f"could not be read ({type(exc).__name__}: {exc})"))
            continue
        try:
            encoded, width, height = process_image(data, settings["image_size"], settings["quality"])
        except ImageDecodeError as exc:
            errors.append((url, str(exc)))
            continue
        images.append((row["image_id"], hashlib.sha256(data).hexdigest(), width, height))
        total += len(encoded)
        label = row["label"] if isinstance(row["label"], str) and row["label"] else None
        columns["image_id"].append(row["image_id"])
        columns["image"].append(encoded)
        columns["label"].append(label)
        columns["label_idx"].append(CLASS_INDEX[label] if label else -1)
        columns["age"].append(None if is_missing(row["age"]) else float(row["age"]))
        for key in ("sex", "site", "lesion_id"):
            columns[key].append(None if is_missing(row[key]) else str(row[key]))
        columns["source"].append(row["source"])
        columns["fold"].append(int(row["fold"]))
        columns["width"].append(width)
        columns["height"].append(height)
    if not errors:
        table = pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)
        fs, path = get_fs(shard_url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression=_COMPRESSION, use_dictionary=[c for c in columns if c != "image"])
    return {"images": images, "errors": errors, "bytes": total}
