"""SQL tables of DermAID (SQLAlchemy 2) and the engine factory. The one place for table definitions.

    engine = create_db_engine("sqlite:///uploads/uploads.db")   # or postgresql+psycopg2://user@host/db
    init_db(engine)           # a new database: migrated to head; at head: nothing; older: error naming `dermaid db upgrade`

Tables (their history: the Alembic migrations in dermaid/uploads/migrations, applied by dermaid.uploads.schema):
    uploads   one row per consented upload (written by dermaid.uploads.store after its blobs exist)
    labels    dermatologists' labels, several per upload, insert-only (written by dermaid.uploads.labels)

SQLite (the default, one machine): WAL journal and a busy timeout, so concurrent writers from
threads and replica processes wait for the lock instead of failing. PostgreSQL in deployment.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Engine, Float, ForeignKey, Integer, String, Text, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dermaid.errors import DermaidError

SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits up to this long for the lock (50+ concurrent inserts queue briefly)


class Base(DeclarativeBase):
    pass


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


class Upload(Base):
    """A consented upload: the metadata sent, the model's prediction, and where its blobs live."""

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)            # uuid4, never from client input
    created: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow, index=True)
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    site: Mapped[str | None] = mapped_column(String(32), nullable=True)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)            # {class code: probability}
    top_class: Mapped[str] = mapped_column(String(8), index=True)
    malignancy_score: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float, index=True)                 # nats; the review queue's order
    ood_score: Mapped[float | None] = mapped_column(Float, nullable=True)     # the OOD detector's; None: no detector
    abstain: Mapped[bool | None] = mapped_column(Boolean, nullable=True, index=True)  # refused: first in the queue
    blobs: Mapped[dict[str, str]] = mapped_column(JSON)                      # {"image"|"input"|"record": key}
    image_format: Mapped[str | None] = mapped_column(String(8), nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)              # of the raw bytes (duplicates)
    consent: Mapped[bool] = mapped_column(Boolean, default=True)
    # digest of the consumer's secret lookup/deletion token (shown once at consent, never stored in the clear)
    lookup_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)
    exported: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # first labels-export

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created.isoformat() if self.created else None,
            "model_version": self.model_version,
            "age": self.age,
            "sex": self.sex,
            "site": self.site,
            "probabilities": dict(self.probabilities),
            "top_class": self.top_class,
            "malignancy_score": self.malignancy_score,
            "entropy": self.entropy,
            "ood_score": self.ood_score,
            "abstain": self.abstain,
            "blobs": dict(self.blobs),
            "image_format": self.image_format,
            "width": self.width,
            "height": self.height,
            "sha256": self.sha256,
            "consent": self.consent,
            "exported": self.exported.isoformat() if self.exported else None,   # (lookup_digest is never shown)
        }


def create_db_engine(db_url: str) -> Engine:
    """SQLAlchemy engine; SQLite gets WAL + busy timeout (and its directory is created)."""
    try:
        url = make_url(db_url)
    except ArgumentError as exc:
        raise DermaidError(f"storage.db_url: not a database URL {db_url!r} ({exc})") from None
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        from pathlib import Path

        Path(url.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                           pool_size=8, max_overflow=32)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 (DB-API objects)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")            # readers never block the writer
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")            # a committed upload survives a power cut
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def init_db(engine: Engine) -> None:
    """A new database gets every migration; one at head is used as is; an older one is refused with the
    command that upgrades it (dermaid.uploads.schema.ensure_schema: replicas never alter tables)."""
    from dermaid.uploads.schema import ensure_schema

    ensure_schema(engine)


# --- labels (dermatologist review; written by dermaid.uploads.labels) ------------------------------------------


class Label(Base):
    """One reviewer's label for one upload. Rows are only ever inserted (the history is never rewritten);
    a reviewer who changes their mind adds a newer row, and the newest row per reviewer counts."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    upload_id: Mapped[str] = mapped_column(String(36), ForeignKey("uploads.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)          # from the token, never from the body
    code: Mapped[str] = mapped_column(String(8))                             # dermaid.classes.REVIEW_CODES
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow, index=True)
    source: Mapped[str] = mapped_column(String(16), default="web")          # web | api | labelstudio
    external_id: Mapped[str | None] = mapped_column(String(160), nullable=True, unique=True)  # Label Studio annotation
    model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the prediction the reviewer saw
    imported_by: Mapped[str | None] = mapped_column(String(64), nullable=True)   # the token holder of an import
    confidence: Mapped[str | None] = mapped_column(String(8), nullable=True)     # low | medium | high
    advice: Mapped[str | None] = mapped_column(String(16), nullable=True)        # none | visit | biopsy
    blinded: Mapped[bool | None] = mapped_column(Boolean, nullable=True)         # chosen before seeing the model

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "upload_id": self.upload_id,
            "reviewer": self.reviewer,
            "code": self.code,
            "comment": self.comment,
            "created": as_utc(self.created).isoformat() if self.created else None,
            "source": self.source,
            "external_id": self.external_id,
            "model_version": self.model_version,
            "imported_by": self.imported_by,
            "confidence": self.confidence,
            "advice": self.advice,
            "blinded": self.blinded,
        }


class ReviewerToken(Base):
    """A dermatologist's bearer token, added and revoked at run time (`dermaid reviewers add|revoke|list`).

    Only the token's digest is stored (dermaid.auth: tokens are 256-bit random, so a digest lookup is safe and
    costs the same for every request); revoking sets `revoked`, the row stays for the record. A name has at
    most one active token."""

    __tablename__ = "reviewer_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)
    digest: Mapped[str] = mapped_column(String(128), unique=True)            # dermaid.auth's stored form
    created: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    revoked: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def as_utc(value: _dt.datetime) -> _dt.datetime:
    """In UTC. SQLite returns naive datetimes for DateTime(timezone=True) columns: they were stored in UTC."""
    return value.astimezone(_dt.timezone.utc) if value.tzinfo is not None else value.replace(tzinfo=_dt.timezone.utc)
