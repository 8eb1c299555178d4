"""People's tag decisions, XMP sidecars and their outbox; `photo_tags` applies decisions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

from cliptagd.models import BigInt, PathText

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SHOWN = "('tagged', 'stale')"

# The tags shown, as store/reader.py computes them: a computed tag unless a decision is on
# it (or an added label of a single set takes its place), plus every added label at 1.0.
VIEW = f"""CREATE VIEW photo_tags AS
SELECT photos.path AS path, shown.label_set AS label_set, shown.label AS label,
       shown.score AS score, photos.tagged_at AS tagged_at, shown.decided AS decided
FROM (
    SELECT tags.photo_id, tags.label_set, tags.label, tags.score, 0 AS decided FROM tags
    WHERE NOT EXISTS (
        SELECT 1 FROM decisions d
        WHERE d.photo_id = tags.photo_id AND d.label_set = tags.label_set
          AND (d.label = tags.label OR (d.replaces AND d.action = 'added')))
    UNION ALL
    SELECT photo_id, label_set, label, 1.0, 1 FROM decisions WHERE action = 'added'
) AS shown JOIN photos ON photos.id = shown.photo_id
WHERE photos.status IN {SHOWN}"""

OLD_VIEW = (
    "CREATE VIEW photo_tags AS "
    "SELECT photos.path AS path, tags.label_set AS label_set, tags.label AS label, "
    "tags.score AS score, photos.tagged_at AS tagged_at "
    "FROM tags JOIN photos ON photos.id = tags.photo_id "
    f"WHERE photos.status IN {SHOWN}"
)


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column(
            "photo_id",
            sa.Integer(),
            sa.ForeignKey("photos.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("label_set", sa.Text(), primary_key=True),
        sa.Column("label", sa.Text(), primary_key=True),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("replaces", sa.Boolean(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "sidecar_outbox",
        sa.Column(
            "photo_id",
            sa.Integer(),
            sa.ForeignKey("photos.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("queued_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "sidecars",
        sa.Column("path", PathText, primary_key=True),
        sa.Column("raw_path", sa.LargeBinary(), nullable=True),
        sa.Column("photo_id", sa.Integer(), nullable=True, index=True),
        sa.Column("size", BigInt, nullable=True),
        sa.Column("mtime_ns", BigInt, nullable=True),
        sa.Column("created", sa.Boolean(), nullable=False),
        sa.Column("owned", sa.Text(), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.Column("restored", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.execute("DROP VIEW photo_tags")
    op.execute(VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW photo_tags")
    op.execute(OLD_VIEW)
    op.drop_table("sidecars")
    op.drop_table("sidecar_outbox")
    op.drop_table("decisions")
