"""Baseline: the uploads and labels tables as they were before migrations.

`init_db` (SQLAlchemy create_all) made them so until then.
A database created that way has no alembic_version table; dermaid.uploads.schema.upgrade stamps it at this
revision before upgrading (no table is touched).

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("age", sa.Float(), nullable=True),
        sa.Column("sex", sa.String(16), nullable=True),
        sa.Column("site", sa.String(32), nullable=True),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("top_class", sa.String(8), nullable=False),
        sa.Column("malignancy_score", sa.Float(), nullable=False),
        sa.Column("entropy", sa.Float(), nullable=False),
        sa.Column("blobs", sa.JSON(), nullable=False),
        sa.Column("image_format", sa.String(8), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("consent", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("created", "entropy", "model_version", "top_class", "sha256"):
        op.create_index(f"ix_uploads_{column}", "uploads", [column])
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("upload_id", sa.String(36), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("code", sa.String(8), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("external_id", sa.String(160), nullable=True),
        sa.Column("model_version", sa.String(128), nullable=True),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("external_id"),
    )
    for column in ("reviewer", "created", "upload_id"):
        op.create_index(f"ix_labels_{column}", "labels", [column])


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("uploads")
