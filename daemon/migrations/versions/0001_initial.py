"""The first schema: photos, tags and the photo_tags view.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from cliptagd.models import BigInt, PathText

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "photos",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("path", PathText, nullable=False, unique=True),
        sa.Column("size", BigInt, nullable=False),
        sa.Column("mtime", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=True),
        sa.Column("model_id", sa.Text(), nullable=True),
        sa.Column("queued_at", sa.DateTime(), nullable=False),
        sa.Column("tagged_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_photos_status", "photos", ["status"])
    op.create_table(
        "tags",
        sa.Column("id", BigInt, primary_key=True),
        sa.Column(
            "photo_id",
            sa.Integer(),
            sa.ForeignKey("photos.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("label_set", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.UniqueConstraint("photo_id", "label_set", "label", name="uq_tags_photo_set_label"),
    )
    op.create_index("ix_tags_label_set_score", "tags", ["label", "label_set", "score"])
    op.execute(
        "CREATE VIEW photo_tags AS "
        "SELECT photos.path AS path, tags.label_set AS label_set, tags.label AS label, "
        "tags.score AS score, photos.tagged_at AS tagged_at "
        "FROM tags JOIN photos ON photos.id = tags.photo_id "
        "WHERE photos.status = 'tagged'"
    )


def downgrade() -> None:
    op.execute("DROP VIEW photo_tags")
    op.drop_table("tags")
    op.drop_table("photos")
