"""Videos beside photos: each row's kind.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild), so the triggers on photos stay as they are; every
    # row so far is a photo.
    op.add_column("photos", sa.Column("kind", sa.String(8), nullable=False, server_default="photo"))


def downgrade() -> None:
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("kind")
