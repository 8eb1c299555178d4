"""Several hosts on one database: claims under a lease, the hosts, the config in use.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild), so the triggers on photos stay as they are.
    op.add_column("photos", sa.Column("claimed_by", sa.Text(), nullable=True))
    op.add_column("photos", sa.Column("lease_until", sa.DateTime(), nullable=True))
    op.add_column("photos", sa.Column("unopened_on", sa.Text(), nullable=True))
    op.create_table(
        "hosts",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.Column("config", sa.Text(), nullable=True),
        sa.Column("waiting", sa.Text(), nullable=True),
        sa.Column("tagged", sa.Integer(), nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("settings")
    op.drop_table("hosts")
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("unopened_on")
        batch.drop_column("lease_until")
        batch.drop_column("claimed_by")
