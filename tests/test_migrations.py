"""Schema migrations of the uploads database (Alembic; dermaid.uploads.schema): on SQLite and PostgreSQL, a
database made before migrations is upgraded with no row lost, the migrations build exactly the tables in
dermaid/uploads/db.py, one migrator at a time, and an out-of-date database is refused with the fix (no Ray)."""

from __future__ import annotations

import datetime as _dt
import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from dermaid.errors import DermaidError
from dermaid.uploads.db import Base, create_db_engine
from dermaid.uploads.labels import LabelStore
from dermaid.uploads.schema import current_revision, head_revision, upgrade
from dermaid.uploads.store import UploadStore

PROBS = {"MEL": 0.1, "NV": 0.6, "BCC": 0.1, "AK": 0.05, "BKL": 0.05, "DF": 0.04, "VASC": 0.03, "SCC": 0.03}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_db_url(request, tmp_path):
    """An empty database: a SQLite file, or a new database on $DERMAID_TEST_POSTGRES_URL's server (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/uploads.db"
        return
    yield request.getfixturevalue("fresh_postgres_url")


def _pre_migration_metadata() -> sa.MetaData:
    """The two tables exactly as dermaid/uploads/db.py declared them before migrations (create_all made them)."""
    metadata = sa.MetaData()
    sa.Table("uploads", metadata,
             sa.Column("id", sa.String(36), primary_key=True),
             sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
             sa.Column("model_version", sa.String(128), nullable=False, index=True),
             sa.Column("age", sa.Float), sa.Column("sex", sa.String(16)), sa.Column("site", sa.String(32)),
             sa.Column("probabilities", sa.JSON, nullable=False),
             sa.Column("top_class", sa.String(8), nullable=False, index=True),
             sa.Column("malignancy_score", sa.Float, nullable=False),
             sa.Column("entropy", sa.Float, nullable=False, index=True),
             sa.Column("blobs", sa.JSON, nullable=False),
             sa.Column("image_format", sa.String(8)), sa.Column("width", sa.Integer), sa.Column("height", sa.Integer),
             sa.Column("sha256", sa.String(64), nullable=False, index=True),
             sa.Column("consent", sa.Boolean, nullable=False))
    sa.Table("labels", metadata,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("upload_id", sa.String(36), sa.ForeignKey("uploads.id"), nullable=False, index=True),
             sa.Column("reviewer", sa.String(64), nullable=False, index=True),
             sa.Column("code", sa.String(8), nullable=False), sa.Column("comment", sa.Text),
             sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
             sa.Column("source", sa.String(16), nullable=False),
             sa.Column("external_id", sa.String(160), unique=True), sa.Column("model_version", sa.String(128)))
    return metadata


def _old_rows(n: int) -> tuple[list[dict], list[dict]]:
    """n uploads (entropy rising with i) and one label on the first, as yesterday's server stored them."""
    created = _dt.datetime(2026, 11, 1, tzinfo=_dt.timezone.utc)
    uploads = [{"id": str(uuid.uuid4()), "created": created + _dt.timedelta(minutes=i), "model_version": "m-float-old",
                "age": 40.0 + i, "sex": "female", "site": "back", "probabilities": PROBS, "top_class": "NV",
                "malignancy_score": 0.23, "entropy": 1.0 + i / 10, "blobs": {"image": f"blobs/{i}/image.jpg"},
                "image_format": "JPEG", "width": 600, "height": 450, "sha256": f"{i:064d}", "consent": True}
               for i in range(n)]
    labels = [{"upload_id": uploads[0]["id"], "reviewer": "ana", "code": "NV", "comment": "typical", "created": created,
               "source": "web", "external_id": None, "model_version": "m-float-old"}]
    return uploads, labels


def test_the_migrations_build_exactly_the_declared_tables(fresh_db_url):
    engine = create_db_engine(fresh_db_url)
    assert upgrade(engine) == (None, head_revision())
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []  # db.py and the migrations agree: a column added without a migration fails here


def test_a_database_made_before_migrations_is_upgraded_with_no_row_lost(fresh_db_url, tmp_path, dermaid_cli):
    engine = create_db_engine(fresh_db_url)
    old = _pre_migration_metadata()
    old.create_all(engine)
    uploads, labels = _old_rows(5)
    with engine.begin() as connection:
        connection.execute(old.tables["uploads"].insert(), uploads)
        connection.execute(old.tables["labels"].insert(), labels)

    with pytest.raises(DermaidError, match="revision none.*dermaid db upgrade"):
        UploadStore(str(tmp_path / "blobs"), fresh_db_url)  # a replica never alters tables: it names the fix

    upgraded = dermaid_cli("db", "upgrade", f"storage.url={tmp_path / 'blobs'}", f"storage.db_url={fresh_db_url}",
                           cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"0001 -> {head_revision()}" in upgraded.stdout
    assert current_revision(engine) == head_revision()

    store = UploadStore(str(tmp_path / "blobs"), fresh_db_url)
    for row in uploads:  # every column of every row as it was; the new columns empty
        kept = store.get(row["id"])
        assert {key: kept[key] for key in ("model_version", "age", "probabilities", "entropy", "blobs", "sha256")} \
            == {key: row[key] for key in ("model_version", "age", "probabilities", "entropy", "blobs", "sha256")}
        assert kept["ood_score"] is None and kept["abstain"] is None
    history = LabelStore(store).history(uploads[0]["id"])
    assert [(label["reviewer"], label["code"], label["comment"]) for label in history] == [("ana", "NV", "typical")]
    assert store.count() == 5
    again = dermaid_cli("db", "upgrade", f"storage.url={tmp_path / 'blobs'}", f"storage.db_url={fresh_db_url}",
                        cwd=tmp_path)
    assert again.returncode == 0 and "already current" in again.stdout
    engine.dispose()


def test_two_migrators_at_once_one_migrates_the_other_finds_it_done(fresh_db_url):
    engines = [create_db_engine(fresh_db_url) for _ in range(3)]
    results, errors = [], []

    def migrate(engine):
        try:
            results.append(upgrade(engine))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(results, key=str) == sorted([(None, head_revision())] + [(head_revision(), head_revision())] * 2,
                                              key=str)
    for engine in engines:
        engine.dispose()


def test_a_database_from_a_newer_dermaid_is_refused_and_left_alone(tmp_path):
    url = f"sqlite:///{tmp_path}/uploads.db"
    store = UploadStore(str(tmp_path / "blobs"), url)  # a new database: migrated to head by the store itself
    assert current_revision(store.engine) == head_revision()
    with store.engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DermaidError, match="revision 9999, which this DermAID does not know"):
        UploadStore(str(tmp_path / "blobs"), url)
    assert current_revision(store.engine) == "9999"


def test_db_command_reports_and_refuses_an_unknown_action(tmp_path, dermaid_cli):
    made = dermaid_cli("db", "upgrade", f"storage.url={tmp_path / 'up'}", cwd=tmp_path)
    assert made.returncode == 0 and f"new database -> {head_revision()}" in made.stdout
    current = dermaid_cli("db", "current", f"storage.url={tmp_path / 'up'}", cwd=tmp_path)
    assert current.returncode == 0 and f"revision {head_revision()}" in current.stdout
    history = dermaid_cli("db", "history", cwd=tmp_path)
    assert history.returncode == 0 and history.stdout.splitlines()[0].startswith("0001")
    wrong = dermaid_cli("db", "frobnicate", cwd=tmp_path)
    assert wrong.returncode == 2 and "expected upgrade, current or history" in wrong.stderr
