"""The prediction log: one image-free row per answered prediction, written in batches to Parquet partitions by day.

    log = PredictionLog("gs://bucket/monitoring", on_rows=count)   # in a Serve replica; starts its flusher thread
    log.append(row)                                               # never blocks, never raises
    log.close()                                                   # flush what is pending (replica shutdown)
    frame = read_log("gs://bucket/monitoring", start, end, model_version="abc123")   # the report's window

Layout under monitoring.url (any fsspec URL: a local dir, gs://bucket/prefix, memory:// in tests):
    predictions/date=2026-11-29/part-<unix ms>-<writer id>-<n>.parquet
One file per batch (flush_rows rows, or whatever arrived in flush_interval_s), never one per request; the
hive-style `date=` folders let pyarrow read a window's days only. Rows: dermaid.monitoring.features.prediction_row
(LOG_SCHEMA), nothing that identifies a person.

Off the request path: append() puts the row on an in-memory queue bounded by max_pending_rows and returns;
a daemon thread writes the batches. The request never waits for the store and never fails because of it:
a full queue, a store that raises, or a day past max_mb_per_day drops rows, counts them through
on_rows(outcome, n) (serve/metrics.py turns that into dermaid_prediction_log_rows_total{outcome}) and logs
one warning per minute at most, not one per request. Partitions older than retention_days are deleted by the
writer once an hour, so the log is bounded in size by max_mb_per_day x retention_days.
"""

from __future__ import annotations

import collections
import datetime as _dt
import io
import logging
import threading
import time
import uuid
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from dermaid.files import get_fs, join
from dermaid.monitoring.features import PROBABILITY_COLUMNS, STAT_COLUMNS

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"
WARN_EVERY_S = 60.0        # a failing store is logged once a minute, not per request
PURGE_EVERY_S = 3600.0     # old partitions are looked for once an hour

LOG_SCHEMA = pa.schema(
    [("time", pa.timestamp("ms", tz="UTC")), ("model_version", pa.string()), ("route", pa.string())]
    + [(column, pa.float64()) for column in PROBABILITY_COLUMNS]
    + [("top_class", pa.string()), ("malignancy_score", pa.float64()), ("entropy", pa.float64()),
       ("ood_score", pa.float64()), ("abstain", pa.bool_()), ("triage", pa.string()),
       ("width", pa.int32()), ("height", pa.int32()), ("image_format", pa.string()),
       ("age", pa.float64()), ("sex", pa.string()), ("site", pa.string()), ("consent", pa.bool_()),
       ("latency_ms", pa.float64()), ("decode_ms", pa.float64()), ("forward_ms", pa.float64())]
    + [(column, pa.float64()) for column in STAT_COLUMNS]
)

RowsCallback = Callable[[str, int], None]   # (outcome, rows): written | dropped_store_error | dropped_queue_full | dropped_day_full


class PredictionLog:
    """Batched, bounded, background Parquet writer of prediction rows (see the module docstring)."""

    def __init__(self, url: str, *, flush_rows: int = 500, flush_interval_s: float = 30.0,
                 max_pending_rows: int = 20000, max_mb_per_day: float | None = 256.0,
                 retention_days: float | None = 90.0, on_rows: RowsCallback | None = None,
                 on_pending: Callable[[int], None] | None = None) -> None:
        self.url = str(url)
        self.flush_rows = max(1, int(flush_rows))
        self.flush_interval_s = float(flush_interval_s)
        self.max_pending_rows = max(1, int(max_pending_rows))
        self.max_bytes_per_day = None if max_mb_per_day is None else int(float(max_mb_per_day) * 1024 * 1024)
        self.retention_days = retention_days
        self._on_rows = on_rows or (lambda outcome, n: None)
        self._on_pending = on_pending or (lambda n: None)
        self._writer_id = uuid.uuid4().hex[:8]
        self._sequence = 0
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._day_bytes: dict[str, int] = {}   # date -> bytes this writer counted (seeded from the store per day)
        self._last_warning = -WARN_EVERY_S
        self._last_purge = -PURGE_EVERY_S
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # -- request side: never blocks on the store, never raises ------------------------------------------------

    def append(self, row: dict[str, Any]) -> None:
        """Queue one row for the next batch; counted as dropped_queue_full when max_pending_rows are waiting."""
        try:
            with self._lock:
                if len(self._pending) >= self.max_pending_rows:
                    full = True
                else:
                    full = False
                    self._pending.append(row)
                    pending = len(self._pending)
            if full:
                self._lost("dropped_queue_full", 1, f"{self.max_pending_rows} rows already wait for the store")
            elif pending >= self.flush_rows:
                self._wake.set()
        except Exception:  # noqa: BLE001 - monitoring must never fail a request
            logger.exception("prediction log: a row could not be queued")

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write everything pending now (in the calling thread); used by close() and tests."""
        while self._write_batch():
            pass

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the flusher and write what is pending."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self.flush()

    # -- the flusher thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            while self._write_batch():
                pass
            self._purge_old()

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(self.flush_rows, len(self._pending)))]
            left = len(self._pending)
        self._on_pending(left)
        return batch

    def _write_batch(self) -> bool:
        """Write up to flush_rows pending rows, one file per day among them; True when rows were taken."""
        batch = self._take()
        if not batch:
            return False
        by_day: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for row in batch:
            by_day[_as_utc(row["time"]).strftime("%Y-%m-%d")].append(row)
        for day, rows in by_day.items():
            try:
                self._write_day(day, rows)
            except Exception as exc:  # noqa: BLE001 - a down or full store: count, warn once a minute, go on
                self._lost("dropped_store_error", len(rows), f"{type(exc).__name__}: {exc}")
        return True

    def _write_day(self, day: str, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist([{**row, "time": _as_utc(row["time"])} for row in rows], schema=LOG_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        used = self._used_today(day)
        if self.max_bytes_per_day is not None and used + len(data) > self.max_bytes_per_day:
            self._lost("dropped_day_full", len(rows), f"{day} holds {used} bytes; the bound is "
                                                      f"{self.max_bytes_per_day} (monitoring.max_mb_per_day)")
            return
        self._sequence += 1
        name = f"part-{int(time.time() * 1000)}-{self._writer_id}-{self._sequence:06d}.parquet"
        fs, path = get_fs(join(self.url, PREDICTIONS_DIR, f"date={day}", name))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
        self._day_bytes[day] = used + len(data)
        self._on_rows("written", len(rows))

    def _used_today(self, day: str) -> int:
        """Bytes of the day's partition: read from the store once per day and writer, then counted here."""
        if day not in self._day_bytes:
            self._day_bytes = {day: _partition_bytes(self.url, day)}  # older days no longer matter
        return self._day_bytes[day]

    def _purge_old(self) -> None:
        now = time.monotonic()
        if self.retention_days is None or now - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = now
        try:
            purge_partitions(self.url, float(self.retention_days))
        except Exception as exc:  # noqa: BLE001 - retried in an hour
            self._warn(f"prediction log: old partitions could not be deleted ({type(exc).__name__}: {exc})")

    def _lost(self, outcome: str, rows: int, why: str) -> None:
        self._on_rows(outcome, rows)
        self._warn(f"prediction log: {rows} row(s) dropped ({outcome}): {why}; requests are answered as usual")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            logger.warning("%s (this warning repeats at most once a minute)", message)


def _as_utc(value: Any) -> _dt.datetime:
    if isinstance(value, str):
        value = _dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc)


def _partition_bytes(url: str, day: str) -> int:
    fs, path = get_fs(join(url, PREDICTIONS_DIR, f"date={day}"))
    try:
        return int(sum(info.get("size") or 0 for info in fs.ls(path, detail=True)))
    except (FileNotFoundError, OSError):
        return 0


def purge_partitions(url: str, retention_days: float, now: _dt.datetime | None = None) -> list[str]:
    """Delete the day partitions older than retention_days; their dates."""
    fs, path = get_fs(join(url, PREDICTIONS_DIR))
    if not fs.exists(path):
        return []
    cutoff = ((now or _dt.datetime.now(_dt.timezone.utc)) - _dt.timedelta(days=retention_days)).strftime("%Y-%m-%d")
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("date=") and name[5:] < cutoff:
            fs.rm(entry, recursive=True)
            removed.append(name[5:])
    return removed


def read_log(url: str, start: _dt.datetime, end: _dt.datetime, model_version: str | None = None):
    """The rows logged in [start, end) (UTC; naive times are taken as UTC), optionally of one model version,
    as a pandas DataFrame with LOG_SCHEMA's columns, sorted by time; empty (same columns) when there are none."""
    import pandas as pd

    start, end = _as_utc(start), _as_utc(end)
    fs, root = get_fs(join(url, PREDICTIONS_DIR))
    files = []
    day = start.date()
    while day <= end.date():
        folder = f"{root.rstrip('/')}/date={day.isoformat()}"
        if fs.exists(folder):
            files += sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))
        day += _dt.timedelta(days=1)
    if not files:
        return LOG_SCHEMA.empty_table().to_pandas()
    tables = []
    for path in files:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=LOG_SCHEMA))
    frame = pa.concat_tables(tables).to_pandas()
    keep = (frame["time"] >= pd.Timestamp(start)) & (frame["time"] < pd.Timestamp(end))
    if model_version:
        keep &= frame["model_version"] == model_version
    return frame[keep].sort_values("time").reset_index(drop=True)
