"""Torch datasets over prepared records, and the per-worker sharded read.

    records, info = read_worker_records(version_url, "train", fold, rank, world_size)
    dataset = LesionDataset(records, create_train_transform(spec, augment))   # (3,H,W), (14,), label
    dataset = LesionDataset(records, None, raw=True)   # (JPEG bytes (n,) uint8, (14,), label): the GPU path

Memory: every image's encoded bytes sit in one read-only numpy buffer with an offsets array (PackedImages),
not in a list of Python bytes objects. DataLoader workers fork from the training process and read that buffer
in place, never writing to it, so no page of it is ever copied into a worker. With a list of bytes, reading
an item writes its reference count, and each worker gets a private copy of every object's first page as the
epochs go by (~4 KB per image per worker: ~400 MB for 25k images and 4 workers).
benchmarks/loader_throughput.py measures both storages; tests/test_loader.py checks no worker copies the buffer.

Sharding: every Ray Train worker reads the light columns (ids, labels, folds, metadata; no image
bytes) of the split, takes its own contiguous block of rows (rank r of W gets rows
[r*N/W, (r+1)*N/W) in storage order) and then reads the image bytes of only the Parquet row
groups that hold its block. No worker reads every image; blocks differ by at most one row and
training pads them to the same length, so every worker runs the same number of DDP steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dermaid.data.images import open_image
from dermaid.data.transforms import TrainAugment, create_eval_transform
from dermaid.errors import DermaidError
from dermaid.models.metadata import METADATA_DIM, encode_metadata
from dermaid.files import get_fs, join

IMAGE_COLUMN = "image"


class PackedImages:
    """Encoded images held once: one uint8 buffer (all bytes back to back) and int64 offsets (N + 1,).
    Item i is a read-only view, never a copy; no Python object per image (see the module docstring)."""

    def __init__(self, images: Sequence[bytes] | pa.Array | pa.ChunkedArray) -> None:
        if isinstance(images, (pa.Array, pa.ChunkedArray)):
            self._from_arrow(images)
            return
        lengths = np.fromiter((len(data) for data in images), dtype=np.int64, count=len(images))
        self.offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])  # (N + 1,)
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)  # (total bytes,)
        for i, data in enumerate(images):
            self.buffer[self.offsets[i]:self.offsets[i + 1]] = np.frombuffer(data, dtype=np.uint8)
        self.buffer.flags.writeable = False

    def _from_arrow(self, images: pa.Array | pa.ChunkedArray) -> None:
        """Zero copy: the Arrow binary array's own data buffer (one contiguous chunk) and its offsets."""
        if isinstance(images, pa.ChunkedArray):
            images = images.combine_chunks() if images.num_chunks != 1 else images.chunk(0)
        if images.null_count:
            raise DermaidError("prepared rows without image bytes")
        wide = pa.types.is_large_binary(images.type)
        _, offsets, data = images.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[images.offset:images.offset + len(images) + 1]
        self.offsets = offsets.astype(np.int64)  # (N + 1,)
        self.buffer = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)  # read-only
        self._arrow = images  # keeps the buffer alive

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.buffer[self.offsets[index]:self.offsets[index + 1]]  # (n,) uint8 view

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes + self.offsets.nbytes)


class LesionDataset(Dataset):
    """Records (a DataFrame or a list of dicts: `image` bytes, optional `age`/`sex`/`site`/`label_idx`,
    `width`/`height`) -> (image, metadata (METADATA_DIM,) float, label_idx long; -1 when unlabeled).

    transform: a TrainAugment (the CPU path: bytes -> (3, S, S), JPEG decoded at a reduced scale where the
    stored size allows), or a PIL transform (open_image first: the eval transform, what Serve runs);
    raw=True: the encoded bytes as a (n,) uint8 tensor, for dermaid.data.gpu_transforms."""

    def __init__(self, records: pd.DataFrame | list[dict[str, Any]], transform, draft_size: int | None = None,
                 raw: bool = False) -> None:
        if isinstance(records, pd.DataFrame) and isinstance(records[IMAGE_COLUMN].dtype, pd.ArrowDtype):
            self.images = PackedImages(pa.array(records[IMAGE_COLUMN].array))  # read_worker_records: no copy
            rows = records.drop(columns=[IMAGE_COLUMN]).to_dict("records")
        else:
            rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else list(records)
            self.images = PackedImages([r[IMAGE_COLUMN] for r in rows])
        self.labels = torch.as_tensor([_label(r.get("label_idx")) for r in rows], dtype=torch.long)  # (N,)
        metadata = [encode_metadata(r.get("age"), r.get("sex"), r.get("site")) for r in rows]
        self.metadata = torch.stack(metadata) if metadata else torch.zeros(0, METADATA_DIM)  # (N, METADATA_DIM)
        self.image_ids: list[str] = [str(r.get("image_id", i)) for i, r in enumerate(rows)]
        sizes = [(_size(r.get("height")), _size(r.get("width"))) for r in rows]
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)  # (N, 2) stored height, width; 0 unknown
        self.transform = transform
        self.draft_size = draft_size
        self.raw = raw

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = self.images[index]  # (n,) uint8 view of the shared buffer
        if self.raw:
            image = torch.from_numpy(data.copy())  # (n,) encoded bytes
        elif isinstance(self.transform, TrainAugment):
            height, width = (int(v) for v in self.sizes[index])
            image = self.transform(data, height, width)  # (3, S, S)
        else:
            image = self.transform(open_image(data.tobytes(), draft_size=self.draft_size))  # (3, H, W)
        return image, self.metadata[index], self.labels[index]  # (3, H, W), (14,), ()


def _size(value: Any) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    return int(value)


def _label(value: Any) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -1
    return int(value)


class EpochShuffleSampler(Sampler[int]):
    """A seeded permutation that changes each epoch (call set_epoch), the same on every resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())


class BalancedSampler(EpochShuffleSampler):
    """Class-balanced sampling with replacement: each row drawn with weight 1 / global class count."""

    def __init__(self, labels: torch.Tensor, class_counts: list[int], seed: int) -> None:
        super().__init__(len(labels), seed)
        counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp(min=1)
        self.weights = 1.0 / counts[labels.clamp(min=0)]  # (N,)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.multinomial(self.weights, self.size, replacement=True, generator=g).tolist())


def create_train_loader(dataset: LesionDataset, batch_size: int, sampling: str, class_counts: list[int],
                        seed: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader with a per-epoch sampler (`loader.sampler.set_epoch(e)`); drops the last partial batch
    (BatchNorm needs more than one sample, and all workers must take the same number of steps)."""
    if sampling == "balanced":
        sampler: EpochShuffleSampler = BalancedSampler(dataset.labels, class_counts, seed)
    else:
        sampler = EpochShuffleSampler(len(dataset), seed)
    batch_size = max(2, min(batch_size, len(dataset)))
    collate = None
    if dataset.raw:
        from dermaid.data.gpu_transforms import collate_encoded

        collate = collate_encoded
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      pin_memory=pin_memory and not dataset.raw, persistent_workers=num_workers > 0,
                      collate_fn=collate)  # OpenCV runs one thread here: TrainAugment sets it before workers fork


def create_eval_loader(records: pd.DataFrame | list[dict[str, Any]], input_spec: dict[str, Any],
                       batch_size: int = 32, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """In-order loader with the evaluation transform (open_image -> create_eval_transform(spec))."""
    dataset = LesionDataset(records, create_eval_transform(input_spec))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)


def _filter_mask(frame: pd.DataFrame, filters: list[tuple]) -> pd.Series:
    """Apply dermaid.data.loading.split_filter's (column, "==" | "!=", value) filters as a row mask."""
    mask = pd.Series(True, index=frame.index)
    for column, op, value in filters:
        mask &= (frame[column] == value) if op == "==" else (frame[column] != value)
    return mask


def read_worker_records(version_url: str, split: str, fold: int, rank: int = 0, world_size: int = 1,
                        labeled_only: bool = True) -> tuple[pd.DataFrame, dict[str, Any]]:
    """This worker's block of a split of a prepared version, with image bytes; plus facts about the split.

    info: num_total (rows in the split), num_rank, per_rank (ceil(N / W): the padded length),
    class_counts (global, over the split), rows_read (rows whose image column chunk was read).
    """
    from dermaid.classes import NUM_CLASSES
    from dermaid.data.loading import read_manifest, split_filter

    manifest = read_manifest(version_url)
    filters = split_filter(split, fold, manifest["settings"]["folds"])
    shard_urls = [join(version_url, rel) for rel in manifest["shards"]]
    light_parts = []
    for file_index, url in enumerate(shard_urls):
        fs, path = get_fs(url)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = [c for c in parquet.schema_arrow.names if c != IMAGE_COLUMN]
            table = parquet.read(columns=columns).to_pandas()
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        table["_file"] = file_index
        table["_row"] = np.arange(len(table))
        table["_group"] = np.repeat(np.arange(len(sizes)), sizes)
        light_parts.append(table)
    if not light_parts:
        raise DermaidError(f"{version_url}: the prepared version lists no shards")
    light = pd.concat(light_parts, ignore_index=True)
    selected = light[_filter_mask(light, filters)]
    if labeled_only:
        selected = selected[selected["label_idx"] >= 0]
    selected = selected.reset_index(drop=True)
    total = len(selected)
    counts = np.bincount(selected["label_idx"][selected["label_idx"] >= 0].astype(int), minlength=NUM_CLASSES)
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    mine = selected.iloc[lo:hi].copy()
    images, rows_read = _read_images(shard_urls, mine)
    mine[IMAGE_COLUMN] = pd.Series(pd.arrays.ArrowExtensionArray(images), index=mine.index)  # Arrow-backed bytes
    mine = mine.drop(columns=["_file", "_row", "_group"]).reset_index(drop=True)
    info = {
        "num_total": total,
        "num_rank": len(mine),
        "per_rank": math.ceil(total / world_size) if total else 0,
        "class_counts": counts.tolist(),
        "rows_read": rows_read,
    }
    return mine, info


def _read_images(shard_urls: list[str], rows: pd.DataFrame) -> tuple[pa.ChunkedArray, int]:
    """Image bytes for `rows` (with _file, _row, _group) as one Arrow binary column in the rows' order (no Python
    object per image: dermaid.data.torch_dataset.PackedImages holds its buffer as is), reading only the row groups
    the rows are in."""
    parts, order, rows_read = [], [], 0
    for file_index, part in rows.groupby("_file"):
        fs, path = get_fs(shard_urls[int(file_index)])
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            groups = sorted(int(g) for g in part["_group"].unique())
            starts = np.concatenate([[0], np.cumsum([parquet.metadata.row_group(i).num_rows
                                                     for i in range(parquet.metadata.num_row_groups)])])
            column = parquet.read_row_groups(groups, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN)
        # file row -> position among the rows of the groups read
        first = {g: int(sum(starts[h + 1] - starts[h] for h in groups if h < g)) for g in groups}
        positions = [first[int(g)] + int(r) - int(starts[int(g)]) for r, g in zip(part["_row"], part["_group"])]
        rows_read += int(sum(starts[g + 1] - starts[g] for g in groups))
        parts.append(column.take(pa.array(positions, type=pa.int64())))
        order.extend(part.index)
    images = pa.chunked_array([chunk for part in parts for chunk in part.chunks], type=pa.binary())
    if order != list(rows.index):  # groupby sorts by file: back to the rows' own order
        where = {label: i for i, label in enumerate(order)}
        images = images.take(pa.array([where[label] for label in rows.index], type=pa.int64()))
    return images, rows_read


def pad_records(records: pd.DataFrame, length: int) -> pd.DataFrame:
    """Repeat rows from the start until `length` rows (equal DDP step counts on every worker)."""
    if len(records) >= length or len(records) == 0:
        return records
    repeats = [records] * (length // len(records)) + [records.iloc[: length % len(records)]]
    return pd.concat(repeats, ignore_index=True).iloc[:length]
