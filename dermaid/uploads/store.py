"""Consented uploads: blobs through fsspec, one row per upload in SQL (dermaid.uploads.db).

    store = UploadStore("uploads")                       # local dir; SQLite at uploads/uploads.db
    store = UploadStore("gs://bucket/uploads", "postgresql+psycopg2://dermaid@db/dermaid")
    upload_id = store.save(image=raw, model_input_png=png, age=55, sex="male", site=None,
                           probabilities=probs, model_version="efficientnet_b0-float-1a2b3c")

Layout under the storage URL:
    blobs/<id>/image.<ext>    the raw bytes as uploaded
    blobs/<id>/input.png      what the model saw (resized centre crop, before normalisation)
    blobs/<id>/record.json    metadata + prediction (the row's content, readable without the database)

An exact duplicate (the same bytes as a stored upload, by sha256) is not stored again: `save` returns the
first upload's id, whose metadata and prediction stay. `stored_bytes(since)` sums the blobs of the uploads
stored since a time (the daily quota of serve/quotas.py).

Writes are atomic from a reader's point of view: the blobs are written first, then the row is inserted
in one transaction. A crash in between leaves blobs without a row ("orphans"); they are never counted
as uploads (everything counts rows) and `find_orphans` lists them for cleanup. A row never exists
without its blobs. Upload ids are uuid4, never derived from client input.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dermaid.classes import CLASS_CODES, MALIGNANT_CODES, NUM_CLASSES
from dermaid.data.images import sniff_format
from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, is_local, join, read_bytes, write_bytes
from dermaid.uploads.db import Upload, create_db_engine, init_db

BLOBS_DIR = "blobs"
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


DATABASE_URL_ENV = "DERMAID_DATABASE_URL"  # the uploads database when storage.db_url is not given (a secret)
# A row's `created` is set before its blobs are written, so a slow write commits after rows created later:
# stored_bytes looks this far behind the newest row it has seen for rows committed since.
COMMIT_LAG = _dt.timedelta(minutes=10)


def database_url(storage_url: str, db_url: str | None = None) -> str:
    """The uploads database: db_url, else $DERMAID_DATABASE_URL, else SQLite beside local blobs."""
    import os

    return db_url or os.environ.get(DATABASE_URL_ENV) or default_db_url(storage_url)


def default_db_url(storage_url: str) -> str:
    """SQLite file beside the blobs for a local storage URL; remote storage needs an explicit db_url."""
    if not is_local(storage_url):
        raise DermaidError(f"storage.db_url: required when storage.url is not local ({storage_url!r}); "
                           "use a PostgreSQL URL")
    _, path = get_fs(storage_url)
    return f"sqlite:///{path.rstrip('/')}/uploads.db"


def require_database(storage_url: str, db_url: str | None = None) -> None:
    """Refuse a SQLite uploads database that does not exist yet (opening it would create an empty one)."""
    url = make_url(db_url or default_db_url(storage_url))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not exists(url.database):
            raise DermaidError(f"storage: no uploads database at {url.database} (storage.url={storage_url}); "
                               "point storage.url / storage.db_url at the server's uploads store")


class UploadStore:
    """Blob store + SQL index of consented uploads."""

    def __init__(self, storage_url: str, db_url: str | None = None) -> None:
        self.storage_url = str(storage_url).rstrip("/")
        self.db_url = db_url or default_db_url(self.storage_url)
        self.engine = create_db_engine(self.db_url)
        init_db(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._usage_lock = threading.Lock()
        self._usage: dict[str, int] = {}      # upload id -> bytes of its blobs, for uploads since _usage_since
        self._usage_since: _dt.datetime | None = None
        self._usage_newest: _dt.datetime | None = None

    def save(self, *, image: bytes, model_input_png: bytes, probabilities: Sequence[float], model_version: str,
             age: float | None = None, sex: str | None = None, site: str | None = None,
             width: int | None = None, height: int | None = None, malignancy_score: float | None = None,
             consent: bool = True, ood: dict[str, Any] | None = None) -> str:
        """Store one upload; returns its id. Only with consent: without it nothing is written.
        ood: {"ood_score", "abstain"} of the prediction (None / missing without an OOD detector).

        The same bytes stored before are not stored again: the earlier upload's id comes back (its metadata
        and prediction stay; reviewers see the photo once). Two identical uploads at the same instant may
        both be stored (the sha256 index is not unique: a duplicate costs space, never a lost upload)."""
        if not consent:
            raise DermaidError("consent: uploads are stored only with the user's consent")
        if len(probabilities) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} probabilities, got {len(probabilities)}")
        digest = hashlib.sha256(image).hexdigest()
        earlier = self.find_duplicate(digest)
        if earlier is not None:
            return earlier
        upload_id = str(uuid.uuid4())
        created = _dt.datetime.now(_dt.timezone.utc)
        image_format = sniff_format(image)
        probs = {code: float(probabilities[i]) for i, code in enumerate(CLASS_CODES)}
        top = max(probs, key=probs.__getitem__)
        score = float(malignancy_score if malignancy_score is not None
                      else sum(probs[c] for c in MALIGNANT_CODES))
        prefix = f"{BLOBS_DIR}/{upload_id}"
        blobs = {
            "image": f"{prefix}/image.{_EXTENSIONS.get(image_format or '', 'bin')}",
            "input": f"{prefix}/input.png",
            "record": f"{prefix}/record.json",
        }
        row = Upload(
            id=upload_id, created=created, model_version=model_version, age=age, sex=sex, site=site,
            probabilities=probs, top_class=top, malignancy_score=score, entropy=entropy(list(probs.values())),
            ood_score=_optional_float((ood or {}).get("ood_score")), abstain=_optional_bool((ood or {}).get("abstain")),
            blobs=blobs, image_format=image_format, width=width, height=height,
            sha256=digest, consent=True,
        )
        record = row_to_record(row)
        # 1) blobs, 2) the row in one transaction: a row never points at missing blobs.
        write_bytes(self.url(blobs["image"]), image)
        write_bytes(self.url(blobs["input"]), model_input_png)
        write_bytes(self.url(blobs["record"]), json.dumps(record, indent=2).encode())
        try:
            with self._session.begin() as session:
                session.add(row)
        except BaseException:
            self._remove_prefix(prefix)  # best effort; anything left is an orphan, never counted
            raise
        return upload_id

    def url(self, key: str) -> str:
        return join(self.storage_url, key)

    def read_blob(self, key: str) -> bytes:
        return read_bytes(self.url(key))

    def get(self, upload_id: str) -> dict[str, Any] | None:
        with self._session() as session:
            row = session.get(Upload, str(upload_id))
            return row.to_dict() if row is not None else None

    def find_duplicate(self, sha256: str) -> str | None:
        """The id of the first stored upload with these bytes (their sha256), or None."""
        with self._session() as session:
            return session.scalar(select(Upload.id).where(Upload.sha256 == sha256, Upload.consent.is_(True))
                                  .order_by(Upload.created, Upload.id).limit(1))

    def stored_bytes(self, since: _dt.datetime) -> int:
        """Bytes of the blobs (photo, model input, record) of the uploads stored since `since`, by any writer:
        the rows come from the database, the sizes from the blob store. Each upload's size is read once and
        remembered (blobs never change), so a call reads only the rows committed since the last one."""
        since = _utc(since)
        with self._usage_lock:
            if self._usage_since != since:
                self._usage, self._usage_since, self._usage_newest = {}, since, since
            start = max(since, self._usage_newest - COMMIT_LAG)
            with self._session() as session:
                rows = session.execute(select(Upload.id, Upload.created, Upload.blobs)
                                       .where(Upload.created >= start)).all()
            new = [(upload_id, created, blobs) for upload_id, created, blobs in rows if upload_id not in self._usage]
            sizes = self._blob_sizes([key for _, _, blobs in new for key in blobs.values()])
            for upload_id, created, blobs in new:
                self._usage[upload_id] = sum(sizes[key] for key in blobs.values())
                self._usage_newest = max(self._usage_newest, _utc(created))
            return sum(self._usage.values())

    def count(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(Upload)) or 0)

    def find_orphans(self) -> list[str]:
        """Blob directories without a row (left by a crash between the blob writes and the insert)."""
        fs, path = get_fs(join(self.storage_url, BLOBS_DIR))
        if not fs.exists(path):
            return []
        ids = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
        with self._session() as session:
            known = set(session.scalars(select(Upload.id).where(Upload.id.in_(ids))).all()) if ids else set()
        return sorted(f"{BLOBS_DIR}/{i}" for i in ids - known)

    def _blob_sizes(self, keys: list[str]) -> dict[str, int]:
        """{key: bytes} of blobs, asked in one batch (gcsfs sends the requests concurrently: a replica's first
        count reads a whole day's uploads); a missing blob counts 0 (removed by hand)."""
        if not keys:
            return {}
        fs, _ = get_fs(self.storage_url)
        paths = [get_fs(self.url(key))[1] for key in keys]
        try:
            return {key: int(size or 0) for key, size in zip(keys, fs.sizes(paths))}
        except (FileNotFoundError, NotADirectoryError):
            pass
        sizes = {}
        for key, path in zip(keys, paths):
            try:
                sizes[key] = int(fs.size(path) or 0)
            except (FileNotFoundError, NotADirectoryError):
                sizes[key] = 0
        return sizes

    def _remove_prefix(self, prefix: str) -> None:
        try:
            fs, path = get_fs(self.url(prefix))
            fs.rm(path, recursive=True)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass


def row_to_record(row: Upload) -> dict[str, Any]:
    """The record.json content for a row (metadata + prediction)."""
    record = row.to_dict()
    record["metadata"] = {"age": record.pop("age"), "sex": record.pop("sex"), "site": record.pop("site")}
    record["prediction"] = {
        "probabilities": record.pop("probabilities"),
        "top_class": record.pop("top_class"),
        "malignancy_score": record.pop("malignancy_score"),
        "entropy": record.pop("entropy"),
    }
    return record


def _utc(value: _dt.datetime) -> _dt.datetime:
    """In UTC; a naive time is UTC already (SQLite returns stored times without their zone)."""
    return value.astimezone(_dt.timezone.utc) if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def entropy(probabilities: Sequence[float]) -> float:
    """Shannon entropy in nats (0 = certain, log(8) ~ 2.08 = uniform): the review queue's uncertainty."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())
