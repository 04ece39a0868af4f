"""uploads.lookup_digest / uploads.exported, labels.confidence / advice / blinded: privacy and blinded review.

Issue #13: a consumer's secret lookup/deletion token is stored only as a digest (unique: one upload per token);
`exported` marks an upload whose labels went into a labels export (a deletion reports it); a label records the
reviewer's confidence, whether a visit or a biopsy is advised, and whether it was chosen blind to the model.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("lookup_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("exported", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_uploads_lookup_digest", "uploads", ["lookup_digest"], unique=True)
    with op.batch_alter_table("labels") as batch:
        batch.add_column(sa.Column("confidence", sa.String(8), nullable=True))
        batch.add_column(sa.Column("advice", sa.String(16), nullable=True))
        batch.add_column(sa.Column("blinded", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("labels") as batch:
        batch.drop_column("blinded")
        batch.drop_column("advice")
        batch.drop_column("confidence")
    op.drop_index("ix_uploads_lookup_digest", table_name="uploads")
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("exported")
        batch.drop_column("lookup_digest")
