"""Consented uploads: blobs through fsspec, one row per upload in SQL (dermaid.uploads.db).

    store = UploadStore("uploads")                       # local dir; SQLite at uploads/uploads.db
    store = UploadStore("gs://bucket/uploads", "postgresql+psycopg2://dermaid@db/dermaid")
    saved = store.save_with_token(image=raw, model_input_png=png, age=55, sex="male", site=None,
                                  probabilities=probs, model_version="efficientnet_b0-float-1a2b3c")
    saved.upload_id, saved.lookup_token       # the reference and the consumer's secret, shown once
    store.holds_token(upload_id, token)       # the consumer's lookup / deletion check (constant cost)
    store.delete(upload_id)                   # blobs, labels and row; -> DeletedUpload (exported: when, if ever)

Layout under the storage URL:
    blobs/<id>/image.<ext>    the photo without its metadata (`clean_image`): pixels only, upright, ICC kept
    blobs/<id>/input.png      what the model saw (resized centre crop, before normalisation)
    blobs/<id>/record.json    metadata + prediction (the row's content, readable without the database)

The photo as sent is never stored: `clean_image` decodes it (dermaid.data.images.open_image: EXIF orientation
applied to the pixels), and re-encodes the pixels alone (JPEG and MPO as JPEG quality 95, WebP as WebP quality
95, everything else as lossless PNG; an RGB ICC colour profile is kept, nothing else: no EXIF, GPS, XMP, IPTC,
comments, maker notes, thumbnails, extra frames). Exports and Label Studio tasks read this blob.

An exact duplicate (the same cleaned image as a stored upload, by the sha256 of the stored photo) is not stored
again, and its sender gets no reference and no token: the earlier upload's would hand one person's photo to
another (see `SavedUpload`). `stored_bytes(since)` sums the blobs of the uploads stored since a time (the daily
quota of serve/quotas.py).

Writes are atomic from a reader's point of view: the blobs are written first, then the row is inserted
in one transaction. A crash in between leaves blobs without a row ("orphans"); they are never counted
as uploads (everything counts rows) and `find_orphans` lists them for cleanup. A row never exists
without its blobs. Upload ids are uuid4, never derived from client input. Deleting (`delete`) removes the
labels and the row in one transaction and the blobs before it commits: a failed blob removal deletes nothing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import io
import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from dermaid.auth import create_token, token_digest
from dermaid.classes import CLASS_CODES, MALIGNANT_CODES, NUM_CLASSES
from dermaid.data.images import open_image, sniff_format
from dermaid.errors import DermaidError
from dermaid.files import exists, get_fs, is_local, join, read_bytes, write_bytes
from dermaid.uploads.db import Label, Upload, as_utc, create_db_engine, init_db
from dermaid.uploads.validation import InvalidUploadId, parse_upload_id

BLOBS_DIR = "blobs"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# How a cleaned photo is encoded, by the format it was sent in: lossy stays lossy at a high quality (a re-encode
# changes pixels slightly; the prediction was made from the photo as sent), anything else becomes lossless PNG.
CLEAN_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WEBP"}   # else PNG
CLEAN_QUALITY = 95
_NO_DIGEST = "0" * 64   # compared when a reference has no token digest, so every check does the same work


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


@dataclass(frozen=True)
class CleanImage:
    """A photo re-encoded from its pixels alone: `data` in `format` (JPEG, WEBP or PNG), width x height upright."""

    data: bytes
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class SavedUpload:
    """What `save_with_token` did. A new upload: its id (the consumer's reference) and its lookup token (shown to
    the sender once, stored only as a digest). A duplicate of a stored photo: no id and no token, and
    duplicate_of names the earlier upload for the server's own use, never for the sender: whoever sends the same
    photo again may not be the person who sent it first, and the earlier reference with a fresh token would let
    them read the dermatologists' review of that person's upload or delete it."""

    upload_id: str | None
    lookup_token: str | None
    duplicate_of: str | None = None


@dataclass(frozen=True)
class DeletedUpload:
    """What `delete` removed: the upload, when it was stored, how many labels, and when its labels first went
    into a labels export (None: never)."""

    upload_id: str
    created: _dt.datetime
    labels: int
    exported: _dt.datetime | None


def clean_image(data: bytes) -> CleanImage:
    """The photo as pixels only: decoded under the pixel limit with its EXIF orientation applied
    (dermaid.data.images.open_image: upright 8-bit RGB), re-encoded from a new image that carries nothing but
    those pixels (JPEG / MPO as JPEG, WebP as WebP, both quality CLEAN_QUALITY; GIF, BMP, TIFF, PNG as lossless
    PNG). An RGB ICC profile is kept so colours look as photographed; any other profile is dropped with the
    mode it described. Nothing else survives: EXIF (GPS, device, time), XMP, IPTC, comments, thumbnails, the
    extra frames of MPO, GIF or TIFF. ImageDecodeError for bytes that are not a supported image."""
    source = sniff_format(data)
    decoded = open_image(data)
    icc = decoded.info.get("icc_profile")
    pixels = Image.fromarray(np.asarray(decoded))   # a new image: no info, no EXIF, nothing but the pixels
    fmt = CLEAN_FORMATS.get(source or "", "PNG")
    options: dict[str, Any] = {"quality": CLEAN_QUALITY} if fmt != "PNG" else {}
    if isinstance(icc, bytes) and icc[16:20] == b"RGB ":   # the profile header's colour space
        options["icc_profile"] = icc
    buf = io.BytesIO()
    pixels.save(buf, format=fmt, **options)
    return CleanImage(buf.getvalue(), fmt, pixels.width, pixels.height)


def lookup_digest(token: Any) -> str | None:
    """The stored form of a consumer's lookup token: the hex SHA-256 (uploads.lookup_digest); None for a value
    that cannot be a token. The reviewer tokens' digest (dermaid.auth.token_digest) without its scheme prefix:
    the tokens are 256-bit random (`create_token`), so a digest can be neither inverted nor searched."""
    digest = token_digest(token)   # "sha256$<hex>"
    return digest.split("$", 1)[1] if digest is not None else None


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

    def save_with_token(self, *, image: bytes, model_input_png: bytes, probabilities: Sequence[float],
                        model_version: str, age: float | None = None, sex: str | None = None,
                        site: str | None = None, malignancy_score: float | None = None, consent: bool = True,
                        ood: dict[str, Any] | None = None) -> SavedUpload:
        """Store one upload, its photo cleaned of metadata (`clean_image`); returns its id and a new lookup token
        (only the token's digest is stored). Only with consent: without it nothing is written.
        ood: {"ood_score", "abstain"} of the prediction (None / missing without an OOD detector).

        The same cleaned photo stored before is not stored again: SavedUpload(None, None, duplicate_of=<the
        earlier id>), the earlier upload's metadata and prediction stay (reviewers see the photo once). Two
        identical uploads at the same instant may both be stored (the sha256 index is not unique: a duplicate
        costs space, never a lost upload)."""
        if not consent:
            raise DermaidError("consent: uploads are stored only with the user's consent")
        if len(probabilities) != NUM_CLASSES:
            raise ValueError(f"expected {NUM_CLASSES} probabilities, got {len(probabilities)}")
        photo = clean_image(image)
        digest = hashlib.sha256(photo.data).hexdigest()
        earlier = self.find_duplicate(digest)
        if earlier is not None:
            return SavedUpload(None, None, duplicate_of=earlier)
        upload_id = str(uuid.uuid4())
        token = create_token()
        created = _dt.datetime.now(_dt.timezone.utc)
        probs = {code: float(probabilities[i]) for i, code in enumerate(CLASS_CODES)}
        top = max(probs, key=probs.__getitem__)
        score = float(malignancy_score if malignancy_score is not None
                      else sum(probs[c] for c in MALIGNANT_CODES))
        prefix = f"{BLOBS_DIR}/{upload_id}"
        blobs = {
            "image": f"{prefix}/image.{_EXTENSIONS[photo.format]}",
            "input": f"{prefix}/input.png",
            "record": f"{prefix}/record.json",
        }
        row = Upload(
            id=upload_id, created=created, model_version=model_version, age=age, sex=sex, site=site,
            probabilities=probs, top_class=top, malignancy_score=score, entropy=entropy(list(probs.values())),
            ood_score=_optional_float((ood or {}).get("ood_score")), abstain=_optional_bool((ood or {}).get("abstain")),
            blobs=blobs, image_format=photo.format, width=photo.width, height=photo.height,
            sha256=digest, consent=True, lookup_digest=lookup_digest(token),
        )
        record = row_to_record(row)
        # 1) blobs, 2) the row in one transaction: a row never points at missing blobs.
        write_bytes(self.url(blobs["image"]), photo.data)
        write_bytes(self.url(blobs["input"]), model_input_png)
        write_bytes(self.url(blobs["record"]), json.dumps(record, indent=2).encode())
        try:
            with self._session.begin() as session:
                session.add(row)
        except BaseException:
            self._remove_prefix(prefix)  # best effort; anything left is an orphan, never counted
            raise
        return SavedUpload(upload_id, token)

    def save(self, **kwargs: Any) -> str:
        """`save_with_token` for callers that hand out no token (tests, imports): the new upload's id, or the
        earlier upload's id for a duplicate."""
        saved = self.save_with_token(**kwargs)
        return str(saved.upload_id or saved.duplicate_of)

    def holds_token(self, upload_id: Any, token: Any) -> bool:
        """Whether `token` is the lookup token of upload `upload_id`. The same work for a malformed, unknown or
        tokenless reference and for a wrong or missing token: one digest, one lookup by id, one constant-time
        comparison (the answer must not tell which references exist)."""
        presented = lookup_digest(token)
        try:
            upload_id = parse_upload_id(upload_id)
        except InvalidUploadId:
            upload_id = None
        stored = None
        if upload_id is not None:
            with self._session() as session:
                stored = session.scalar(select(Upload.lookup_digest).where(Upload.id == upload_id))
        same = hmac.compare_digest(presented or _NO_DIGEST, stored or _NO_DIGEST)
        return same and presented is not None and stored is not None

    def delete(self, upload_id: str, *, only_unreviewed: bool = False) -> DeletedUpload | None:
        """Remove an upload: its labels and its row in one transaction, its blobs before that commits (a blob
        that cannot be removed raises and nothing is deleted). None: no such upload, or with only_unreviewed
        (the retention purge) one that has labels by now. The DeletedUpload says when its labels went into a
        labels export (`exported`): copies in that export stay where it was written."""
        upload_id = parse_upload_id(upload_id)
        with self._session.begin() as session:
            row = session.scalars(select(Upload).where(Upload.id == upload_id).with_for_update()).first()
            if row is None:
                return None
            labels = int(session.scalar(select(func.count()).select_from(Label)
                                        .where(Label.upload_id == upload_id)) or 0)
            if only_unreviewed and labels:
                return None
            deleted = DeletedUpload(upload_id, as_utc(row.created), labels,
                                    as_utc(row.exported) if row.exported else None)
            blobs = dict(row.blobs)
            session.execute(delete(Label).where(Label.upload_id == upload_id))
            session.execute(delete(Upload).where(Upload.id == upload_id))
            session.flush()
            self._remove_blobs(blobs)   # last: a failure here rolls the deletes back
        return deleted

    def unreviewed_before(self, cutoff: _dt.datetime) -> list[str]:
        """Ids of the uploads created before `cutoff` that have no label, oldest first (the retention purge)."""
        labeled = select(Label.upload_id).where(Label.upload_id == Upload.id).exists()
        with self._session() as session:
            return list(session.scalars(select(Upload.id).where(Upload.created < as_utc(cutoff), ~labeled)
                                        .order_by(Upload.created, Upload.id)))

    def mark_exported(self, upload_ids: Sequence[str], when: _dt.datetime | None = None) -> int:
        """Record the first labels export that used these uploads (a later export keeps the first time)."""
        when = as_utc(when or _dt.datetime.now(_dt.timezone.utc))
        ids, changed = list(upload_ids), 0
        with self._session.begin() as session:
            for start in range(0, len(ids), 500):   # bounded IN lists
                result = session.execute(update(Upload).where(Upload.id.in_(ids[start:start + 500]),
                                                              Upload.exported.is_(None)).values(exported=when))
                changed += int(result.rowcount or 0)
        return changed

    def url(self, key: str) -> str:
        return join(self.storage_url, key)

    def read_blob(self, key: str) -> bytes:
        return read_bytes(self.url(key))

    def get(self, upload_id: str) -> dict[str, Any] | None:
        with self._session() as session:
            row = session.get(Upload, str(upload_id))
            return row.to_dict() if row is not None else None

    def find_duplicate(self, sha256: str) -> str | None:
        """The id of the first stored upload whose photo blob has this sha256 (of the cleaned photo), or None."""
        with self._session() as session:
            return session.scalar(select(Upload.id).where(Upload.sha256 == sha256, Upload.consent.is_(True))
                                  .order_by(Upload.created, Upload.id).limit(1))

    def stored_bytes(self, since: _dt.datetime) -> int:
        """Bytes of the blobs (photo, model input, record) of the uploads stored since `since`, by any writer:
        the rows come from the database, the sizes from the blob store. Each upload's size is read once and
        remembered (blobs never change), so a call reads only the rows committed since the last one."""
        since = as_utc(since)
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
                self._usage_newest = max(self._usage_newest, as_utc(created))
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

    def _remove_blobs(self, blobs: dict[str, str]) -> None:
        """Remove an upload's blob directory (blobs/<id>/: `save` writes every blob there) with anything else
        under it; an already missing one is fine. Raises when it cannot be removed."""
        for prefix in sorted({key.rsplit("/", 1)[0] for key in blobs.values()}):
            try:
                self._remove_dir(prefix)
            except FileNotFoundError:
                pass

    def _remove_prefix(self, prefix: str) -> None:
        try:
            self._remove_dir(prefix)
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass

    def _remove_dir(self, prefix: str) -> None:
        """Remove blobs/<id>/ recursively (a local directory; on a bucket, every object under the prefix)."""
        if not prefix.startswith(f"{BLOBS_DIR}/"):
            raise ValueError(f"not a blob directory: {prefix!r}")   # never the store's root or its database
        fs, path = get_fs(self.url(prefix))
        fs.rm(path, recursive=True)


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


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def entropy(probabilities: Sequence[float]) -> float:
    """Shannon entropy in nats (0 = certain, log(8) ~ 2.08 = uniform): the review queue's uncertainty."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum())
