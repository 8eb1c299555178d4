"""RAW+JPEG pairs and Live Photos: the stem a file shares with its pair, and a companion
file's still (see pairs.py).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

import os

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# pairs.py's suffixes as they were when this migration was written: a migration must not
# change when the code does.
_PAIRED = (
    ".jpg", ".jpeg", ".heic", ".heif", ".mov",
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf",
    ".rw2", ".pef", ".srw", ".3fr", ".iiq", ".rwl", ".erf", ".kdc", ".dcr", ".mrw", ".x3f",
)  # fmt: skip


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild), so the triggers on photos stay as they are. No
    # foreign key: a companion whose still's row is gone is simply tagged on its own.
    text = sa.Text().with_variant(sa.dialects.postgresql.TEXT(collation="C"), "postgresql")
    op.add_column("photos", sa.Column("pair_stem", text, nullable=True))
    op.add_column("photos", sa.Column("pair_of", sa.Integer(), nullable=True))
    # The stems of the photos so far; pairs among them are found as their files are next
    # seen changed (existing pairs keep the tags each was given on its own).
    photos = sa.table("photos", sa.column("id", sa.Integer), sa.column("path", sa.Text),
                      sa.column("pair_stem", sa.Text))  # fmt: skip
    conn = op.get_bind()
    rows = conn.execute(sa.select(photos.c.id, photos.c.path)).all()
    stems = [
        {"pid": row.id, "stem": os.path.splitext(row.path)[0] + "."}
        for row in rows
        if os.path.splitext(row.path)[1].lower() in _PAIRED
    ]
    if stems:
        conn.execute(
            photos.update().where(photos.c.id == sa.bindparam("pid"))
            .values(pair_stem=sa.bindparam("stem")),
            stems,
        )  # fmt: skip
    op.create_index("ix_photos_pair_stem", "photos", ["pair_stem"])
    op.create_index("ix_photos_pair_of", "photos", ["pair_of"])


def downgrade() -> None:
    op.drop_index("ix_photos_pair_of", "photos")
    op.drop_index("ix_photos_pair_stem", "photos")
    with op.batch_alter_table("photos") as batch:
        batch.drop_column("pair_of")
        batch.drop_column("pair_stem")
