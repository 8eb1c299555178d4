"""Content fingerprints and kept deletions, so moves no event reported keep their tags.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("photos") as batch:
        batch.add_column(sa.Column("fingerprint", sa.Text(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))
    op.create_index("ix_photos_size", "photos", ["size"])


def downgrade() -> None:
    op.drop_index("ix_photos_size", "photos")
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("fingerprint")
