"""Exploratory data analysis of a records table (any layout `dermaid.data.isic.read_records` reads).

    records = read_records("data/toy", layout="isic2019")
    class_counts(records); plot_class_counts(records); missing_rates(records)
    fold_table(records, folds=5, test_fraction=0.15, seed=0)   # what `dermaid prepare` would split

Tables are DataFrames with classes in DermAID's output order; plots are Figures (reporting.figures).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from dermaid.classes import BY_CODE, CLASS_CODES, SEXES, SITES
from dermaid.data.images import open_image, resize_shorter_side
from dermaid.data.splits import TEST_FOLD, assign_folds, lesion_groups
from dermaid.reporting.figures import create_figure, heatmap, image_grid
from dermaid.files import get_fs, read_bytes

MISSING = "missing"
AGE_BANDS: tuple[int, ...] = (0, 30, 45, 60, 75, 121)  # band edges: ISIC ages cluster 30-75
METADATA_COLUMNS: tuple[str, ...] = ("age", "sex", "site", "lesion_id")
HEADER_BYTES = 64 * 1024  # enough of a JPEG/PNG to read its size without decoding it


def present_classes(records: pd.DataFrame) -> list[str]:
    """Class codes that occur in the table, in output order."""
    labels = set(records["label"].dropna())
    return [c for c in CLASS_CODES if c in labels]


def class_counts(records: pd.DataFrame) -> pd.DataFrame:
    """Per class: name, images, share of all images, and how many times rarer than the largest class."""
    counts = records["label"].value_counts().reindex(list(CLASS_CODES), fill_value=0)
    largest = max(int(counts.max()), 1)
    table = pd.DataFrame({
        "name": [BY_CODE[c].name for c in CLASS_CODES],
        "images": counts.astype(int).values,
        "share": (counts / max(int(counts.sum()), 1)).round(4).values,
        "rarer_than_largest": [round(largest / n, 1) if n else np.nan for n in counts.values],
    }, index=pd.Index(CLASS_CODES, name="class"))
    return table


def imbalance_ratio(records: pd.DataFrame) -> float:
    """Largest class count over smallest non-empty class count (1.0 = balanced)."""
    counts = records["label"].value_counts()
    return float(counts.max() / counts.min()) if len(counts) else float("nan")


def plot_class_counts(records: pd.DataFrame) -> Figure:
    table = class_counts(records)
    fig, ax = create_figure(width=7, height=3.5)
    bars = ax.bar(table.index, table["images"], color=["tab:red" if BY_CODE[c].malignant else "tab:blue"
                                                       for c in table.index])
    for bar, share in zip(bars, table["share"]):
        ax.annotate(f"{share:.1%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(f"Images per class (red: malignant); imbalance {imbalance_ratio(records):.1f}:1")
    return fig


def age_band(age: pd.Series) -> pd.Series:
    """Ages -> band labels ("0-29", ..., "75+"), "missing" for NaN."""
    edges = list(AGE_BANDS)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{edges[-2]}+"]
    bands = pd.cut(pd.to_numeric(age, errors="coerce"), bins=edges, right=False, labels=labels)
    return bands.astype(object).where(bands.notna(), MISSING)


def metadata_table(records: pd.DataFrame, column: str, normalize: bool = False) -> pd.DataFrame:
    """Class x value counts (or shares within each class) of sex, site or age band; with a missing column."""
    if column == "age":
        values = age_band(records["age"])
        order = [*sorted(set(values) - {MISSING}, key=lambda s: int(s.split("-")[0].rstrip("+"))), MISSING]
    else:
        values = records[column].where(records[column].notna(), MISSING)
        vocab = {"sex": SEXES, "site": SITES}.get(column, tuple(sorted(set(values) - {MISSING})))
        order = [*vocab, MISSING]
    table = pd.crosstab(records["label"], values).reindex(index=present_classes(records), columns=order,
                        fill_value=0)
    table.index.name, table.columns.name = "class", column
    if normalize:
        table = table.div(table.sum(axis=1).replace(0, 1), axis=0).round(3)
    return table


def plot_age(records: pd.DataFrame) -> Figure:
    """Age histogram over all images, and the age range per class (box plots)."""
    fig, (left, right) = create_figure(1, 2, width=11, height=3.8)
    ages = records["age"].dropna()
    left.hist(ages, bins=np.arange(0, 125, 5), color="tab:gray")
    left.set_xlabel("age (years)")
    left.set_ylabel("images")
    left.set_title(f"Age, all images ({records['age'].isna().mean():.1%} missing)")
    classes = present_classes(records)
    data = [records.loc[records["label"] == c, "age"].dropna().values for c in classes]
    right.boxplot([d if len(d) else [np.nan] for d in data], tick_labels=classes)
    right.set_ylabel("age (years)")
    right.set_title("Age per class")
    return fig


def plot_metadata_by_class(records: pd.DataFrame, column: str) -> Figure:
    """Overall counts of a metadata column and its share within each class (stacked bars)."""
    table = metadata_table(records, column)
    shares = metadata_table(records, column, normalize=True)
    fig, (left, right) = create_figure(1, 2, width=12, height=4)
    overall = table.sum(axis=0)
    left.barh(list(overall.index.astype(str)), overall.values, color="tab:gray")
    left.invert_yaxis()
    left.set_xlabel("images")
    left.set_title(f"{column}, all images")
    bottom = np.zeros(len(shares))
    colors = _palette(len(shares.columns))
    for value, color in zip(shares.columns, colors):
        right.bar(shares.index, shares[value].values, bottom=bottom, label=str(value), color=color)
        bottom += shares[value].values
    right.set_ylabel("share within class")
    right.set_title(f"{column} per class")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n > 10 else "tab10"]
    colors = [cmap(i) for i in range(n)]
    if n:
        colors[-1] = (0.8, 0.8, 0.8, 1.0)  # the last value is always "missing": grey
    return colors


def missing_rates(records: pd.DataFrame) -> pd.DataFrame:
    """Share of images with each metadata field missing: overall and per class."""
    missing = pd.DataFrame({c: records[c].isna() for c in METADATA_COLUMNS if c in records})
    per_class = missing.groupby(records["label"]).mean().reindex(present_classes(records))
    overall = missing.mean().to_frame("all").T
    return pd.concat([overall, per_class]).round(3).rename_axis("class")


def images_per_lesion(records: pd.DataFrame) -> pd.DataFrame:
    """How many lesions have k images (rows without a lesion id count as single-image lesions)."""
    groups = pd.Series(lesion_groups(records))
    sizes = groups.value_counts()
    table = sizes.value_counts().sort_index().rename("lesions").to_frame()
    table.index.name = "images_per_lesion"
    table["images"] = table.index * table["lesions"]
    return table


def plot_images_per_lesion(records: pd.DataFrame) -> Figure:
    table = images_per_lesion(records)
    fig, ax = create_figure(width=6, height=3.2)
    ax.bar(table.index.astype(str), table["lesions"], color="tab:purple")
    ax.set_xlabel("images of the same lesion")
    ax.set_ylabel("lesions")
    ax.set_title(f"Images per lesion ({len(records)} images, {int(table['lesions'].sum())} lesions)")
    return fig


def image_sizes(records: pd.DataFrame, max_images: int = 500, seed: int = 0, workers: int = 8) -> pd.DataFrame:
    """Width and height of up to `max_images` images (a seeded sample), read from file headers only."""
    sample = records if len(records) <= max_images else records.sample(max_images, random_state=seed)
    urls = sample["image_url"].tolist()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # I/O bound: remote stores benefit
        sizes = list(pool.map(_header_size, urls))
    return pd.DataFrame({
        "image_id": sample["image_id"].values,
        "label": sample["label"].values,
        "width": [s[0] for s in sizes],
        "height": [s[1] for s in sizes],
    })


def _header_size(url: str) -> tuple[int, int]:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as handle:
        head = handle.read(HEADER_BYTES)
    try:
        return Image.open(io.BytesIO(head)).size
    except Exception:  # size marker beyond the first bytes (rare): read the whole file
        return Image.open(io.BytesIO(read_bytes(url))).size


def plot_image_sizes(sizes: pd.DataFrame) -> Figure:
    fig, (left, right) = create_figure(1, 2, width=11, height=3.8)
    counts = sizes.groupby(["width", "height"]).size().rename("images").reset_index()
    left.scatter(counts["width"], counts["height"], s=20 + 200 * counts["images"] / counts["images"].max(),
                 alpha=0.6, color="tab:green")
    left.set_xlabel("width (px)")
    left.set_ylabel("height (px)")
    left.set_title(f"Image sizes ({len(sizes)} images sampled)")
    short = np.minimum(sizes["width"], sizes["height"])
    right.hist(short, bins=20, color="tab:green")
    right.set_xlabel("shorter side (px)")
    right.set_ylabel("images")
    right.set_title("Shorter side")
    return fig


def sample_grid(records: pd.DataFrame, per_class: int = 6, seed: int = 0, thumb: int = 128) -> Figure:
    """`per_class` random images of each class present (one row per class)."""
    rows, labels = [], []
    for code in present_classes(records):
        subset = records[records["label"] == code]
        picks = subset.sample(min(per_class, len(subset)), random_state=seed)
        rows.append([_thumbnail(url, thumb) for url in picks["image_url"]])
        labels.append(f"{code} ({len(subset)})")
    return image_grid(rows, row_labels=labels, title="Sample images per class (images in the class)")


def _thumbnail(url: str, size: int) -> Image.Image:
    return resize_shorter_side(open_image(read_bytes(url), draft_size=size), size)


def fold_table(records: pd.DataFrame, folds: int = 5, test_fraction: float = 0.15, seed: int = 0) -> pd.DataFrame:
    """Class x part image counts of the lesion-grouped split `dermaid prepare` makes (parts: test, fold 0..)."""
    assigned = assign_folds(records, folds=folds, test_fraction=test_fraction, seed=seed)
    part = pd.Series(["test" if f == TEST_FOLD else f"fold {f}" for f in assigned], index=records.index)
    order = (["test"] if (assigned == TEST_FOLD).any() else []) + [f"fold {f}" for f in range(folds)]
    table = pd.crosstab(records["label"], part).reindex(index=present_classes(records), columns=order, fill_value=0)
    table.index.name, table.columns.name = "class", "part"
    return table


def plot_fold_balance(table: pd.DataFrame) -> Figure:
    """Counts per class and part, and each part's class mix (equal columns = balanced split)."""
    fig, (left, right) = create_figure(1, 2, width=12, height=4)
    heatmap(left, table.values, list(table.columns), list(table.index))
    left.set_title("Images per class and part")
    shares = table / table.sum(axis=0).replace(0, 1)
    bottom = np.zeros(len(shares.columns))
    for code, color in zip(shares.index, _palette(len(shares.index) + 1)):
        right.bar(shares.columns, shares.loc[code].values, bottom=bottom, label=code, color=color)
        bottom += shares.loc[code].values
    right.set_ylabel("class share within part")
    right.set_title("Class mix per part")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def fold_balance_spread(table: pd.DataFrame) -> float:
    """Largest absolute difference of a class share between any part and the whole set."""
    overall = table.sum(axis=1) / max(int(table.values.sum()), 1)
    shares = table / table.sum(axis=0).replace(0, 1)
    return float(shares.sub(overall, axis=0).abs().max().max())


def key_figures(records: pd.DataFrame, folds: pd.DataFrame | None = None) -> dict[str, Any]:
    """The numbers automation tracks for a dataset."""
    missing = missing_rates(records).loc["all"]
    figures: dict[str, Any] = {
        "num_images": int(len(records)),
        "num_lesions": int(len(set(lesion_groups(records)))),
        "num_classes_present": len(present_classes(records)),
        "imbalance_ratio": imbalance_ratio(records),
        "class_counts": {c: int(n) for c, n in class_counts(records)["images"].items()},
        **{f"missing/{c}": float(v) for c, v in missing.items()},
    }
    if folds is not None:
        figures["fold_max_share_deviation"] = fold_balance_spread(folds)
    return figures
