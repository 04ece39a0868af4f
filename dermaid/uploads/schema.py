"""The uploads database's schema version: Alembic migrations, applied once under a lock; `dermaid db`.

    dermaid db upgrade                          # the server's store (conf/db.yaml: storage.url / storage.db_url)
    dermaid db current                          # the database's revision and the code's
    dermaid db history                          # every migration, oldest first
    upgrade(engine)        # -> (before, after) revisions; a pre-migration database is stamped at the baseline first
    ensure_schema(engine)  # a new empty database: migrated; at head: nothing; otherwise a DermaidError naming the fix
    python -m dermaid.uploads.schema revision "add the reviewers table"   # autogenerate one after editing db.py

Who migrates: building the Serve app (serve.app.build_app, once per `dermaid serve`, `serve run` or RayService
deploy) runs `upgrade` before any replica starts; replicas and the other commands only check (`ensure_schema`)
and refuse an out-of-date database with the command that fixes it, so replicas never race to alter tables.
The lock: PostgreSQL's session advisory lock; a file lock beside a SQLite file. Two migrators at once: the
second waits, then finds the database at head. On PostgreSQL a migration is one transaction (DDL included).
Migrations live in dermaid/uploads/migrations/versions/; the tables in dermaid/uploads/db.py.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from omegaconf import DictConfig, OmegaConf
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url

from dermaid.config import action_args
from dermaid.errors import DermaidError

SCRIPT_LOCATION = "dermaid.uploads:migrations"
BASELINE = "0001"                  # the tables as create_all made them before migrations existed
ADVISORY_LOCK_KEY = 0x6465726D     # PostgreSQL pg_advisory_lock key of the migrator ("derm")
FILE_LOCK_TIMEOUT_S = 300.0        # a SQLite migrator waits this long for another one

# Alembic logs two INFO lines per connection ("Context impl ..."); `upgrade` returns what changed instead
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)


def head_revision() -> str:
    """The newest migration this code knows."""
    return str(_scripts().get_current_head())


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None for a new database and for one created before migrations."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply the migrations up to `revision` under the migrator's lock; returns (before, after).

    A database whose tables were made by create_all before migrations existed (no alembic_version) is first
    stamped at the baseline (no table touched), then upgraded: no row is lost."""
    with _locked_connection(engine) as connection:
        context = MigrationContext.configure(connection)
        before = context.get_current_revision()
        config = _config(connection)
        if before is None and inspect(connection).has_table("uploads"):
            command.stamp(config, BASELINE)
            before = BASELINE
        command.upgrade(config, revision)
        after = MigrationContext.configure(connection).get_current_revision()
        connection.commit()
    return before, after


def migrate_uploads_database(storage_url: str, db_url: str | None = None) -> tuple[str | None, str | None]:
    """`upgrade` the store's database (db_url, else $DERMAID_DATABASE_URL, else SQLite beside local blobs)."""
    from sqlalchemy.exc import OperationalError

    from dermaid.uploads.db import create_db_engine
    from dermaid.uploads.store import database_url

    url = database_url(storage_url, db_url)
    engine = create_db_engine(url)
    try:
        return upgrade(engine)
    except OperationalError as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        raise DermaidError(f"{shown}: cannot migrate the uploads database ({exc.orig})") from None
    finally:
        engine.dispose()


def ensure_schema(engine: Engine) -> None:
    """Make a new empty database, accept one at head, refuse anything else with the command that fixes it."""
    head = head_revision()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        has_tables = inspect(connection).has_table("uploads")
    if current == head:
        return
    if current is None and not has_tables:
        upgrade(engine)
        return
    where = make_url(engine.url).render_as_string(hide_password=True)
    if current is not None and current not in _known_revisions():
        raise DermaidError(f"{where}: the uploads database is at schema revision {current}, which this DermAID "
                           f"does not know (its newest is {head}): it was migrated by a newer version; run that one")
    raise DermaidError(f"{where}: the uploads database is at schema revision {current or 'none (made before migrations)'}, "
                       f"this DermAID needs {head}: run `dermaid db upgrade storage.db_url=...` (or start "
                       "`dermaid serve`, which upgrades it once before its replicas start)")


def history() -> list[dict[str, str]]:
    """Every migration, oldest first: [{"revision", "down_revision", "doc"}]."""
    scripts = list(_scripts().walk_revisions())[::-1]
    return [{"revision": s.revision, "down_revision": str(s.down_revision or ""), "doc": (s.doc or "").strip()}
            for s in scripts]


def run(cfg: DictConfig) -> dict[str, Any]:
    """`dermaid db upgrade | current | history [storage.url=URL storage.db_url=URL]`."""
    from dermaid.files import absolute_url
    from dermaid.uploads.db import create_db_engine
    from dermaid.uploads.store import database_url

    plain = OmegaConf.to_container(cfg, resolve=True)
    action = str(plain["action"])
    if action == "history":
        for item in history():
            print(f"{item['revision']}  {item['doc'].splitlines()[0] if item['doc'] else ''}")
        return {"history": history()}
    if action not in ("upgrade", "current"):
        raise DermaidError(f"action={action!r}: expected upgrade, current or history (`dermaid db upgrade`)")
    storage_url = absolute_url(plain["storage"]["url"])
    shown = make_url(database_url(storage_url, plain["storage"]["db_url"])).render_as_string(hide_password=True)
    if action == "current":
        engine = create_db_engine(database_url(storage_url, plain["storage"]["db_url"]))
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
        print(f"{shown}: revision {current or 'none'}; this DermAID's newest: {head_revision()}")
        return {"current": current, "head": head_revision()}
    before, after = migrate_uploads_database(storage_url, plain["storage"]["db_url"])
    print(f"{shown}: {before or 'new database'} -> {after}" + (" (already current)" if before == after else ""))
    return {"before": before, "after": after}


hydra_args = action_args   # `dermaid db upgrade k=v` -> `action=upgrade k=v`


def new_revision(message: str) -> str:
    """Autogenerate a migration from the difference between dermaid/uploads/db.py and head (on a scratch
    SQLite database); returns the new file's path. Review it before committing: autogenerate is a draft."""
    import tempfile

    from dermaid.uploads.db import create_db_engine

    with tempfile.TemporaryDirectory() as scratch:
        engine = create_db_engine(f"sqlite:///{scratch}/scratch.db")
        upgrade(engine)
        next_id = f"{int(head_revision()) + 1:04d}"
        with engine.begin() as connection:
            script = command.revision(_config(connection), message=message, autogenerate=True, rev_id=next_id)
        engine.dispose()
    return str(script.path)  # type: ignore[union-attr]  # one script for one head


def _config(connection: Connection | None) -> Config:
    """Alembic's configuration in code (no alembic.ini): the script location and our connection for env.py."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(None))


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


@contextlib.contextmanager
def _locked_connection(engine: Engine) -> Iterator[Connection]:
    """A connection held by the one migrator: PostgreSQL advisory lock, or a file lock beside a SQLite file."""
    url = make_url(engine.url)
    if url.get_backend_name() == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
            try:
                yield connection
            finally:
                connection.rollback()  # nothing uncommitted survives a failed migration
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
                connection.commit()
        return
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        from filelock import FileLock

        lock = FileLock(f"{url.database}.migrate.lock", timeout=FILE_LOCK_TIMEOUT_S)
    with lock, engine.connect() as connection:
        if url.get_backend_name() == "sqlite":
            # a batch migration copies a table and drops the old one: with foreign keys on, the labels that
            # point at uploads would stop it (Alembic's advice; the pragma only works outside a transaction)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            yield connection
        finally:
            if url.get_backend_name() == "sqlite":
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "revision":
        sys.exit('usage: python -m dermaid.uploads.schema revision "what changed"')
    print(new_revision(sys.argv[2]))
