"""Plotting helpers shared by the report modules: headless figures, image grids, heatmaps.

Figures are plain `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state): a notebook
shows one by making it the cell's value, a script saves it with `fig.savefig(path)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

CELL_INCHES = 1.7  # one image of a grid; small enough that an 8-class grid fits a report page


def create_figure(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.0,
                  squeeze: bool = True, **subplot_kw: Any) -> tuple[Figure, Any]:
    """A constrained-layout Figure with an (nrows, ncols) grid of axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, subplot_kw=subplot_kw or None)
    return fig, axes


def to_array(image: Any) -> np.ndarray:
    """PIL image or array -> (H, W, 3) or (H, W) array for imshow."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def image_grid(cells: Sequence[Sequence[Any]], row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
               captions: Sequence[Sequence[str]] | None = None, cell: float = CELL_INCHES,
               title: str | None = None) -> Figure:
    """Images in rows x columns (None leaves a cell blank), labelled on the left and top."""
    nrows = max(1, len(cells))
    ncols = max(1, max((len(r) for r in cells), default=1))
    fig, axes = create_figure(nrows, ncols, width=cell * ncols + 0.6, height=cell * nrows + 0.4, squeeze=False)
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            image = cells[r][c] if r < len(cells) and c < len(cells[r]) else None
            if image is not None:
                ax.imshow(to_array(image))
            if captions is not None and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                ax.set_xlabel(captions[r][c], fontsize=7)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=9)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c], fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def heatmap(ax: Axes, matrix: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str],
            fmt: str = "{:.0f}", cmap: str = "Blues", vmax: float | None = None) -> None:
    """Annotated (R, C) matrix on `ax`; text turns white on dark cells."""
    matrix = np.asarray(matrix, dtype=float)  # (R, C)
    top = vmax if vmax is not None else (np.nanmax(matrix) if matrix.size and np.isfinite(matrix).any() else 1.0)
    ax.imshow(matrix, cmap=cmap, vmin=0, vmax=top or 1.0, aspect="auto")
    ax.set_xticks(range(len(xlabels)), labels=list(xlabels), rotation=45, ha="right")
    ax.set_yticks(range(len(ylabels)), labels=list(ylabels))
    for (r, c), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            dark = top and value > 0.6 * top
            ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
