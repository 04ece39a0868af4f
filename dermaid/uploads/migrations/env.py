"""Alembic's environment: the connection comes from dermaid.uploads.schema (config.attributes["connection"]),
never from an alembic.ini URL, so the one engine factory (dermaid.uploads.db.create_db_engine) applies."""

from alembic import context

from dermaid.uploads.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy-and-move
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
