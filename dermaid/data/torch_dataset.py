"""Torch datasets over prepared records, and the per-worker sharded read.

    records, info = read_worker_records(version_url, "train", fold, rank, world_size)
    dataset = LesionDataset(records, create_train_transform(spec, augment))   # (3,H,W), (14,), label

Sharding: every Ray Train worker reads the light columns (ids, labels, folds, metadata; no image
bytes) of the split, takes its own contiguous block of rows (rank r of W gets rows
[r*N/W, (r+1)*N/W) in storage order) and then reads the image bytes of only the Parquet row
groups that hold its block. No worker reads every image; blocks differ by at most one row and
training pads them to the same length, so every worker runs the same number of DDP steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dermaid.data.images import open_image
from dermaid.data.transforms import create_eval_transform
from dermaid.errors import DermaidError
from dermaid.models.metadata import METADATA_DIM, encode_metadata
from dermaid.files import get_fs, join

IMAGE_COLUMN = "image"


class LesionDataset(Dataset):
    """Records (a DataFrame or a list of dicts: `image` bytes, optional `age`/`sex`/`site`/`label_idx`)
    -> (image (3, H, W) float, metadata (METADATA_DIM,) float, label_idx long; -1 when unlabeled)."""

    def __init__(self, records: pd.DataFrame | list[dict[str, Any]], transform, draft_size: int | None = None) -> None:
        rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else list(records)
        self.images: list[bytes] = [r[IMAGE_COLUMN] for r in rows]
        self.labels = torch.as_tensor([_label(r.get("label_idx")) for r in rows], dtype=torch.long)  # (N,)
        metadata = [encode_metadata(r.get("age"), r.get("sex"), r.get("site")) for r in rows]
        self.metadata = torch.stack(metadata) if metadata else torch.zeros(0, METADATA_DIM)  # (N, METADATA_DIM)
        self.image_ids: list[str] = [str(r.get("image_id", i)) for i, r in enumerate(rows)]
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = open_image(self.images[index], draft_size=self.draft_size)
        return self.transform(image), self.metadata[index], self.labels[index]  # (3, H, W), (14,), ()


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
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


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
    mine[IMAGE_COLUMN], rows_read = _read_images(shard_urls, mine)
    mine = mine.drop(columns=["_file", "_row", "_group"]).reset_index(drop=True)
    info = {
        "num_total": total,
        "num_rank": len(mine),
        "per_rank": math.ceil(total / world_size) if total else 0,
        "class_counts": counts.tolist(),
        "rows_read": rows_read,
    }
    return mine, info


def _read_images(shard_urls: list[str], rows: pd.DataFrame) -> tuple[list[bytes], int]:
    """Image bytes for `rows` (with _file, _row, _group), reading only the row groups they are in."""
    images: dict[tuple[int, int], bytes] = {}
    rows_read = 0
    for file_index, part in rows.groupby("_file"):
        fs, path = get_fs(shard_urls[int(file_index)])
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            groups = sorted(int(g) for g in part["_group"].unique())
            starts = np.concatenate([[0], np.cumsum([parquet.metadata.row_group(i).num_rows
                                                     for i in range(parquet.metadata.num_row_groups)])])
            column = parquet.read_row_groups(groups, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).to_pylist()
        # rows of the groups read, in order: map file row -> position in `column`
        position, offset = {}, 0
        for g in groups:
            for r in range(int(starts[g]), int(starts[g + 1])):
                position[r] = offset
                offset += 1
        rows_read += offset
        for r in part["_row"]:
            images[(int(file_index), int(r))] = column[position[int(r)]]
    return [images[(int(f), int(r))] for f, r in zip(rows["_file"], rows["_row"])], rows_read


def pad_records(records: pd.DataFrame, length: int) -> pd.DataFrame:
    """Repeat rows from the start until `length` rows (equal DDP step counts on every worker)."""
    if len(records) >= length or len(records) == 0:
        return records
    repeats = [records] * (length // len(records)) + [records.iloc[: length % len(records)]]
    return pd.concat(repeats, ignore_index=True).iloc[:length]
