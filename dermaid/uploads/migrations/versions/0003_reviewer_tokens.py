"""reviewer_tokens table and labels.imported_by: tokens managed at run time, imports attributed to their sender.

Issues #13 / #18: dermatologist tokens can be added and revoked without a redeploy (stored as digests only);
a Label Studio import records the token holder who sent it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "reviewer_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(128), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    op.create_index("ix_reviewer_tokens_reviewer", "reviewer_tokens", ["reviewer"])
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("imported_by", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("imported_by")
    op.drop_index("ix_reviewer_tokens_reviewer", table_name="reviewer_tokens")
    op.drop_table("reviewer_tokens")
