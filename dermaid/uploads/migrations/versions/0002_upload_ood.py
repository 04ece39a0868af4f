"""uploads.ood_score and uploads.abstain: the prediction's OOD decision, refused photos first in review.

Issue #11: the review queue puts the photos the model refused first. NULL for rows stored before (and for
checkpoints without an OOD detector).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("abstain", sa.Boolean(), nullable=True))
    op.create_index("ix_uploads_abstain", "uploads", ["abstain"])


def downgrade() -> None:
    op.drop_index("ix_uploads_abstain", table_name="uploads")
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("abstain")
        batch.drop_column("ood_score")
