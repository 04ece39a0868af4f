"""Readers for the two real dataset layouts, from any fsspec URL, into one records table; the one ISIC 2019 writer.

    from dermaid.data.isic import read_records
    records = read_records("data/isic2019", layout="isic2019")      # or gs://bucket/isic2019, memory://...
    records = read_records("data/HAM10000", layout="ham10000")
    write_isic2019(out, rows, image=lambda i: (jpeg_bytes, "jpg"))    # `dermaid synth` and `dermaid labels-export`

ISIC 2019:  ISIC_2019_Training_Input/*.jpg (+ ATTRIBUTION.txt, LICENSE.txt),
            ISIC_2019_Training_GroundTruth.csv (image,MEL,...,SCC,UNK one-hot floats),
            ISIC_2019_Training_Metadata.csv (image,age_approx,anatom_site_general,lesion_id,sex).
HAM10000:   HAM10000_metadata.csv (lesion_id,image_id,dx,dx_type,age,sex,localization[,dataset]),
            images in HAM10000_images_part_1/ and HAM10000_images_part_2/.

The table (docs/interfaces.md): image_id, image_url, label, age, sex, site, lesion_id, source.
Missing metadata stays missing (NaN / None). Bad input raises `DatasetError` naming the file and
the first offending rows. Images present but not listed are logged and listed in
`records.attrs["unlisted"]`, never used.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermaid.classes import (
    CLASS_CODES, HAM10000_DX_TO_CODE, HAM10000_LOCALIZATION_TO_SITE, SEXES, SITES, SUBMISSION_CODES, UNKNOWN_CODE,
    AGE_RANGE,
)
from dermaid.errors import DermaidError
from dermaid.files import absolute_url, get_fs, join, write_bytes, write_text

log = logging.getLogger(__name__)

RECORD_COLUMNS: tuple[str, ...] = ("image_id", "image_url", "label", "age", "sex", "site", "lesion_id", "source")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
MAX_NAMED = 5  # how many offending rows / images an error message names

ISIC2019_INPUT_DIR = "ISIC_2019_Training_Input"
ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_METADATA_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")


class DatasetError(DermaidError, ValueError):
    """A raw dataset does not fit its layout: the message names the file and the offending rows."""


@dataclass(frozen=True)
class IsicRow:
    """One image of an ISIC 2019 layout as `write_isic2019` writes it (None: an empty CSV field)."""

    image_id: str
    label: str                # a class code: the one 1.0 of the ground-truth row
    age_approx: str | None    # as written: the caller chooses the format ("55.0" in ISIC's own CSV)
    site: str | None
    lesion_id: str | None
    sex: str | None


# ---------------------------------------------------------------------------------------------
# Public API


def read_isic2019(root: str, source: str = "isic2019") -> pd.DataFrame:
    """Records of an ISIC 2019 layout (ground truth + metadata + image folder) at `root`."""
    gt_url = join(root, ISIC2019_GROUND_TRUTH)
    gt = _read_csv(gt_url)
    _require_columns(gt, gt_url, ("image",))
    unknown = [c for c in gt.columns if c != "image" and c not in CLASS_CODES and c != UNKNOWN_CODE]
    if unknown:
        raise DatasetError(f"{gt_url}: unknown class column(s) {unknown}; expected image,{','.join(CLASS_CODES)}[,UNK]")
    _require_columns(gt, gt_url, CLASS_CODES)
    images = _clean_ids(gt["image"], gt_url, "image")
    _check_unique(images, gt_url, "image")
    labels = _one_hot_labels(gt, gt_url)

    meta_url = join(root, ISIC2019_METADATA)
    meta = _read_csv(meta_url)
    _require_columns(meta, meta_url, ISIC2019_METADATA_COLUMNS)
    meta_ids = _clean_ids(meta["image"], meta_url, "image")
    _check_unique(meta_ids, meta_url, "image")
    unknown_rows = [i for i, image_id in enumerate(meta_ids) if image_id not in set(images)]
    if unknown_rows:
        raise DatasetError(
            f"{meta_url}: metadata for {len(unknown_rows)} image(s) not in {ISIC2019_GROUND_TRUTH}: "
            + _name_rows(unknown_rows, meta_ids)
        )
    meta = pd.DataFrame({  # validated in the CSV's own row order, so errors name the right lines
        "age": _ages(meta["age_approx"], meta_url),
        "sex": _sexes(meta["sex"], meta_url),
        "site": _sites(meta["anatom_site_general"], meta_url),
        "lesion_id": _optional_strings(meta["lesion_id"]),
    }, index=pd.Index(meta_ids, name="image")).reindex(images)  # images without a row: all missing
    index = _image_index(root, [ISIC2019_INPUT_DIR])
    records = pd.DataFrame({
        "image_id": images,
        "label": labels,
        "age": meta["age"].to_numpy(dtype=float),
        "sex": _optional_strings(meta["sex"]),
        "site": _optional_strings(meta["site"]),
        "lesion_id": _optional_strings(meta["lesion_id"]),
    })
    return _attach_images(records, index, root, gt_url, source)


def read_ham10000(root: str, source: str = "ham10000") -> pd.DataFrame:
    """Records of a HAM10000 layout (metadata CSV + two image folders) at `root`."""
    url = join(root, HAM10000_METADATA)
    meta = _read_csv(url)
    _require_columns(meta, url, HAM10000_COLUMNS)
    images = _clean_ids(meta["image_id"], url, "image_id")
    _check_unique(images, url, "image_id")
    dx = meta["dx"].map(lambda v: v.strip().lower() if isinstance(v, str) else v)
    bad = [i for i, v in enumerate(dx) if v not in HAM10000_DX_TO_CODE]
    if bad:
        raise DatasetError(f"{url}: unknown dx value(s) (known: {sorted(HAM10000_DX_TO_CODE)}): "
                           + _name_rows(bad, [f"{images[i]} dx={meta['dx'].iloc[i]!r}" for i in range(len(images))]))
    loc = meta["localization"].map(lambda v: v.strip().lower() if isinstance(v, str) else None)
    bad = [i for i, v in enumerate(loc) if v is not None and v not in HAM10000_LOCALIZATION_TO_SITE]
    if bad:
        raise DatasetError(f"{url}: unknown localization value(s): "
                           + _name_rows(bad, [f"{images[i]} localization={loc.iloc[i]!r}" for i in range(len(images))]))
    records = pd.DataFrame({
        "image_id": images,
        "label": [HAM10000_DX_TO_CODE[v] for v in dx],
        "age": _ages(meta["age"], url),
        "sex": _sexes(meta["sex"], url),
        "site": [None if v is None else HAM10000_LOCALIZATION_TO_SITE[v] for v in loc],
        "lesion_id": _optional_strings(meta["lesion_id"]),
    })
    index = _image_index(root, HAM10000_IMAGE_DIRS)
    return _attach_images(records, index, root, url, source)


READERS: dict[str, Callable[..., pd.DataFrame]] = {"isic2019": read_isic2019, "ham10000": read_ham10000}


def read_records(root: str, layout: str = "isic2019", source: str | None = None) -> pd.DataFrame:
    """Records of the dataset at `root` in `layout` ("isic2019" or "ham10000")."""
    if layout not in READERS:
        raise DatasetError(f"unknown dataset layout {layout!r}; known: {sorted(READERS)}")
    return READERS[layout](absolute_url(root), source=source or layout)


def raw_files(root: str, layout: str = "isic2019") -> list[str]:
    """Paths of the files a layout reads, relative to root: the CSVs and the image folders."""
    if layout == "isic2019":
        return [ISIC2019_GROUND_TRUTH, ISIC2019_METADATA, ISIC2019_INPUT_DIR]
    if layout == "ham10000":
        return [HAM10000_METADATA, *HAM10000_IMAGE_DIRS]
    raise DatasetError(f"unknown dataset layout {layout!r}; known: {sorted(READERS)}")


def write_isic2019(root: str, rows: Sequence[IsicRow], image: Callable[[int], tuple[bytes, str]],
                   workers: int = 1) -> None:
    """Write the ISIC 2019 training layout at `root`: the images, the ground-truth CSV, the metadata CSV.

    image(i) -> (encoded bytes, file extension) of rows[i], called in `workers` threads; the images
    are written first, the two CSVs after them (a reader never finds a listed image missing).
    """
    def _write_image(index: int) -> None:
        data, extension = image(index)
        write_bytes(join(root, ISIC2019_INPUT_DIR, f"{rows[index].image_id}.{extension}"), data)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_write_image, range(len(rows))))
    ground_truth = [[row.image_id, *("1.0" if code == row.label else "0.0" for code in SUBMISSION_CODES)]
                    for row in rows]
    metadata = [[row.image_id, *("" if value is None else value
                                 for value in (row.age_approx, row.site, row.lesion_id, row.sex))] for row in rows]
    write_text(join(root, ISIC2019_GROUND_TRUTH), _csv_text(["image", *SUBMISSION_CODES], ground_truth))
    write_text(join(root, ISIC2019_METADATA), _csv_text(list(ISIC2019_METADATA_COLUMNS), metadata))


# ---------------------------------------------------------------------------------------------
# Helpers


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _read_csv(url: str) -> pd.DataFrame:
    try:
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{url}: file not found") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DatasetError(f"{url}: could not be read ({type(exc).__name__}: {exc})") from None
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{url}: not a readable CSV ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _require_columns(table: pd.DataFrame, url: str, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{url}: missing column(s) {missing}; found {list(table.columns)}")


def _name_rows(rows: list[int], labels: list[str] | pd.Series) -> str:
    """'3 rows, first: row 2 (ISIC_0000001), ...' with CSV line numbers (header = line 1)."""
    labels = list(labels)
    shown = ", ".join(f"line {i + 2} ({labels[i]})" for i in rows[:MAX_NAMED])
    more = f" and {len(rows) - MAX_NAMED} more" if len(rows) > MAX_NAMED else ""
    return f"{shown}{more}"


def _clean_ids(column: pd.Series, url: str, name: str) -> list[str]:
    ids = [str(v).strip() for v in column]
    empty = [i for i, v in enumerate(ids) if not v]
    if empty:
        raise DatasetError(f"{url}: empty {name} on " + _name_rows(empty, ["''"] * len(ids)))
    return ids


def _check_unique(ids: list[str], url: str, name: str) -> None:
    seen: set[str] = set()
    dup = []
    for i, v in enumerate(ids):
        if v in seen:
            dup.append(i)
        seen.add(v)
    if dup:
        raise DatasetError(f"{url}: duplicate {name} on " + _name_rows(dup, ids))


def _one_hot_labels(gt: pd.DataFrame, url: str) -> list[str]:
    codes = [c for c in (*CLASS_CODES, UNKNOWN_CODE) if c in gt.columns]
    values = gt[codes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)  # (N, C)
    ids = gt["image"].astype(str).str.strip().tolist()
    ok = np.isfinite(values).all(axis=1) & np.isin(values, (0.0, 1.0)).all(axis=1) & (values.sum(axis=1) == 1.0)
    bad = np.flatnonzero(~ok).tolist()
    if bad:
        raise DatasetError(f"{url}: {len(bad)} row(s) are not one-hot over {','.join(codes)}: " + _name_rows(bad, ids))
    labels = [codes[j] for j in values.argmax(axis=1)]
    unk = [i for i, code in enumerate(labels) if code == UNKNOWN_CODE]
    if unk:
        raise DatasetError(f"{url}: {len(unk)} row(s) are labelled UNK, which is not a training class: "
                           + _name_rows(unk, ids))
    return labels


def _optional_strings(column: pd.Series) -> list[str | None]:
    return [None if pd.isna(v) or str(v).strip() == "" else str(v).strip() for v in column]


def _ages(column: pd.Series, url: str) -> np.ndarray:
    raw = _optional_strings(column)
    ages = pd.to_numeric(pd.Series(raw, dtype=object), errors="coerce").to_numpy(dtype=float)
    low, high = AGE_RANGE
    bad = [i for i, (r, a) in enumerate(zip(raw, ages)) if r is not None and not (low <= a <= high)]
    if bad:
        raise DatasetError(f"{url}: age is not a number in {low}..{high} on "
                           + _name_rows(bad, [repr(v) for v in raw]))
    return ages  # NaN = missing


def _sexes(column: pd.Series, url: str) -> list[str | None]:
    values = [None if v is None or v.lower() == "unknown" else v.lower() for v in _optional_strings(column)]
    bad = [i for i, v in enumerate(values) if v is not None and v not in SEXES]
    if bad:
        raise DatasetError(f"{url}: sex is not one of {list(SEXES)} (or empty/unknown) on "
                           + _name_rows(bad, [repr(v) for v in values]))
    return values


def _sites(column: pd.Series, url: str) -> list[str | None]:
    values = [None if v is None or v.lower() == "unknown" else v.lower() for v in _optional_strings(column)]
    bad = [i for i, v in enumerate(values) if v is not None and v not in SITES]
    if bad:
        raise DatasetError(f"{url}: anatomical site is not one of {list(SITES)} (or empty) on "
                           + _name_rows(bad, [repr(v) for v in values]))
    return values


def _image_index(root: str, folders: Iterable[str]) -> dict[str, str]:
    """image id (file stem) -> path relative to root, over the image files in `folders`."""
    fs, root_path = get_fs(root)
    root_path = root_path.rstrip("/")
    index: dict[str, str] = {}
    found_folder = False
    for folder in folders:
        folder_path = f"{root_path}/{folder}"
        try:
            if not fs.isdir(folder_path):
                continue
            names = fs.find(folder_path)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{join(root, folder)}: could not be listed ({type(exc).__name__}: {exc})") from None
        found_folder = True
        for name in sorted(names):
            stem, ext = posixpath.splitext(posixpath.basename(name))
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue  # ATTRIBUTION.txt, LICENSE.txt, ...
            relative = name.lstrip("/")[len(root_path.lstrip("/")) :].lstrip("/")
            if stem in index:
                raise DatasetError(f"{join(root, relative)}: image {stem!r} occurs twice "
                                   f"(also {join(root, index[stem])})")
            index[stem] = relative
    if not found_folder:
        raise DatasetError(f"{root}: no image folder found (expected {' or '.join(folders)})")
    if not index:
        raise DatasetError(f"{root}: no images (.jpg/.jpeg/.png) in {', '.join(folders)}")
    return index


def _attach_images(records: pd.DataFrame, index: dict[str, str], root: str, listed_in: str,
                   source: str) -> pd.DataFrame:
    missing = [i for i, image_id in enumerate(records["image_id"]) if image_id not in index]
    if missing:
        raise DatasetError(
            f"{listed_in}: {len(missing)} listed image(s) not found under {root}: "
            + _name_rows(missing, records["image_id"].tolist())
        )
    listed = set(records["image_id"])
    unlisted = sorted(image_id for image_id in index if image_id not in listed)
    if unlisted:
        log.warning("%s: %d image(s) present but not listed in %s are not used (first: %s)",
                    root, len(unlisted), listed_in, ", ".join(unlisted[:MAX_NAMED]))
    records = records.assign(
        image_url=[join(root, index[image_id]) for image_id in records["image_id"]],
        source=source,
    )
    records = records[list(RECORD_COLUMNS)].reset_index(drop=True)
    records["age"] = records["age"].astype("float64")
    records.attrs["unlisted"] = unlisted
    return records
