"""The local metrics history of a training run: DIR/history.csv, one row per epoch.

Written by the rank-0 worker after every epoch (the whole file, so a resumed run rewrites it from
its checkpointed rows); read by notebooks and reports without W&B:

    from dermaid.training.history import read_history
    frame = read_history("runs/toy")      # columns: epoch, train/loss, val/balanced_accuracy, ...
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from dermaid.files import exists, join, read_text, write_text

HISTORY_FILE = "history.csv"
_LEAD = ("epoch", "attempt", "train/loss", "val/loss", "val/balanced_accuracy", "val/auc_macro", "lr", "seconds")


def history_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The lead columns first, then every other key in first-seen order."""
    columns = [c for c in _LEAD if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_history(run_dir: str, rows: list[dict[str, Any]]) -> str:
    """Write rows (dicts of scalars) to run_dir/history.csv; returns its URL."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=history_columns(rows), lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    url = join(run_dir, HISTORY_FILE)
    write_text(url, buf.getvalue())
    return url


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def read_history(run_dir: str):
    """run_dir/history.csv as a pandas DataFrame (empty when the run has no finished epoch yet)."""
    import pandas as pd

    url = join(run_dir, HISTORY_FILE)
    if not exists(url):
        return pd.DataFrame(columns=list(_LEAD))
    return pd.read_csv(io.StringIO(read_text(url)))


def format_epoch_line(row: dict[str, Any], epochs: int, best: bool) -> str:
    """The console progress line for one epoch."""
    return (
        f"epoch {int(row['epoch']):>3}/{epochs}  train/loss {row['train/loss']:.4f}  "
        f"val/loss {row['val/loss']:.4f}  val/balanced_accuracy {row['val/balanced_accuracy']:.4f}  "
        f"val/auc_macro {row['val/auc_macro']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
        + ("  *best" if best else "")
    )
