"""RAW+JPEG pairs and Live Photos: a companion file's still (see pairs.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild), so the triggers on photos stay as they are. No
    # foreign key: a companion whose still's row is gone is simply tagged on its own.
    op.add_column("photos", sa.Column("pair_of", sa.Integer(), nullable=True))
    op.create_index("ix_photos_pair_of", "photos", ["pair_of"])


def downgrade() -> None:
    op.drop_index("ix_photos_pair_of", "photos")
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("pair_of")
