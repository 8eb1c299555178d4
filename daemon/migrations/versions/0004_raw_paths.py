"""Raw file names that are not valid UTF-8, and what a failure happened under.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild), so the triggers on photos stay as they are.
    op.add_column("photos", sa.Column("raw_path", sa.LargeBinary(), nullable=True))
    op.add_column("photos", sa.Column("failed_with", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("failed_with")
        batch.drop_column("raw_path")
