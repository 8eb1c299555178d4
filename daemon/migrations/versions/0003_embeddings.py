"""Stored image embeddings, label-set digests, and photos waiting to be re-encoded.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

VIEW = (
    "CREATE VIEW photo_tags AS "
    "SELECT photos.path AS path, tags.label_set AS label_set, tags.label AS label, "
    "tags.score AS score, photos.tagged_at AS tagged_at "
    "FROM tags JOIN photos ON photos.id = tags.photo_id "
    "WHERE photos.status IN ({})"
)


def upgrade() -> None:
    op.create_table(
        "embeddings",
        sa.Column(
            "photo_id",
            sa.Integer(),
            sa.ForeignKey("photos.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("model_id", sa.Text(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])
    op.create_table(
        "label_sets",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("digest", sa.Text(), nullable=False),
    )
    # A photo waiting to be encoded again by a new model keeps its old tags meanwhile.
    op.execute("DROP VIEW photo_tags")
    op.execute(VIEW.format("'tagged', 'stale'"))


def downgrade() -> None:
    op.execute("DROP VIEW photo_tags")
    op.execute(VIEW.format("'tagged'"))
    op.drop_table("label_sets")
    op.drop_index("ix_embeddings_model_id", "embeddings")
    op.drop_table("embeddings")
