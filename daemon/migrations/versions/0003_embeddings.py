"""Stored image embeddings, label-set digests, photos waiting to be re-encoded, and label
counts kept up to date by triggers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from cliptagd.models import BigInt

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


SHOWN = "('tagged', 'stale')"

# label_counts holds, per set and label, how many photos the queries show carry it, so
# `labels` reads a few hundred rows instead of grouping millions. Triggers keep it exact
# whoever writes (cliptagd or anyone with sqlite3): a tag added or removed on a shown photo,
# a photo shown or hidden (its status), a shown photo deleted (its tags then go by cascade,
# when the photo row is already gone, so the tag trigger does not count them twice).
TRIGGERS = [
    f"""CREATE TRIGGER label_counts_tag_added AFTER INSERT ON tags
    WHEN (SELECT status FROM photos WHERE id = NEW.photo_id) IN {SHOWN}
    BEGIN
        INSERT INTO label_counts (label_set, label, count) VALUES (NEW.label_set, NEW.label, 1)
        ON CONFLICT (label_set, label) DO UPDATE SET count = count + 1;
    END""",
    f"""CREATE TRIGGER label_counts_tag_removed AFTER DELETE ON tags
    WHEN (SELECT status FROM photos WHERE id = OLD.photo_id) IN {SHOWN}
    BEGIN
        UPDATE label_counts SET count = count - 1
        WHERE label_set = OLD.label_set AND label = OLD.label;
    END""",
    f"""CREATE TRIGGER label_counts_photo_shown AFTER UPDATE OF status ON photos
    WHEN OLD.status NOT IN {SHOWN} AND NEW.status IN {SHOWN}
    BEGIN
        INSERT INTO label_counts (label_set, label, count)
        SELECT label_set, label, 1 FROM tags WHERE photo_id = NEW.id AND true
        ON CONFLICT (label_set, label) DO UPDATE SET count = count + 1;
    END""",
    f"""CREATE TRIGGER label_counts_photo_hidden AFTER UPDATE OF status ON photos
    WHEN OLD.status IN {SHOWN} AND NEW.status NOT IN {SHOWN}
    BEGIN
        UPDATE label_counts SET count = count - 1
        WHERE (label_set, label) IN (SELECT label_set, label FROM tags WHERE photo_id = OLD.id);
    END""",
    f"""CREATE TRIGGER label_counts_photo_deleted BEFORE DELETE ON photos
    WHEN OLD.status IN {SHOWN}
    BEGIN
        UPDATE label_counts SET count = count - 1
        WHERE (label_set, label) IN (SELECT label_set, label FROM tags WHERE photo_id = OLD.id);
    END""",
]
# The same on PostgreSQL: PL/pgSQL functions, one per table. A photo's cascade-deleted
# tags find no photo row (it is gone), as on SQLite, so they are not counted twice.
PG_TRIGGERS = [
    # Tags come and go a batch at a time: one statement-level trigger per statement, the
    # batch's counts added up (in label order), instead of one upsert per tag.
    f"""CREATE FUNCTION label_counts_tags_added() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO label_counts (label_set, label, count)
        SELECT t.label_set, t.label, count(*) FROM added t JOIN photos p ON p.id = t.photo_id
        WHERE p.status IN {SHOWN} GROUP BY t.label_set, t.label ORDER BY t.label_set, t.label
        ON CONFLICT (label_set, label) DO UPDATE SET count = label_counts.count + EXCLUDED.count;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION label_counts_tags_removed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE label_counts c SET count = c.count - d.n
        FROM (SELECT t.label_set, t.label, count(*) AS n FROM removed t
              JOIN photos p ON p.id = t.photo_id WHERE p.status IN {SHOWN}
              GROUP BY t.label_set, t.label) AS d
        WHERE c.label_set = d.label_set AND c.label = d.label;
        RETURN NULL;
    END $$""",
    f"""CREATE FUNCTION label_counts_photos() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            IF OLD.status IN {SHOWN} THEN
                UPDATE label_counts SET count = count - 1 WHERE (label_set, label) IN
                    (SELECT label_set, label FROM tags WHERE photo_id = OLD.id);
            END IF;
            RETURN OLD;
        END IF;
        IF OLD.status NOT IN {SHOWN} AND NEW.status IN {SHOWN} THEN
            INSERT INTO label_counts (label_set, label, count)
            SELECT label_set, label, 1 FROM tags WHERE photo_id = NEW.id
            ON CONFLICT (label_set, label) DO UPDATE SET count = label_counts.count + 1;
        ELSIF OLD.status IN {SHOWN} AND NEW.status NOT IN {SHOWN} THEN
            UPDATE label_counts SET count = count - 1 WHERE (label_set, label) IN
                (SELECT label_set, label FROM tags WHERE photo_id = OLD.id);
        END IF;
        RETURN NEW;
    END $$""",
    "CREATE TRIGGER label_counts_tag_added AFTER INSERT ON tags REFERENCING NEW TABLE AS "
    "added FOR EACH STATEMENT EXECUTE FUNCTION label_counts_tags_added()",
    "CREATE TRIGGER label_counts_tag_removed AFTER DELETE ON tags REFERENCING OLD TABLE AS "
    "removed FOR EACH STATEMENT EXECUTE FUNCTION label_counts_tags_removed()",
    "CREATE TRIGGER label_counts_photo_status AFTER UPDATE OF status ON photos "
    "FOR EACH ROW EXECUTE FUNCTION label_counts_photos()",
    "CREATE TRIGGER label_counts_photo_deleted BEFORE DELETE ON photos "
    "FOR EACH ROW EXECUTE FUNCTION label_counts_photos()",
    # Numbers in commit order: the transaction lock (0x636C69700003, held to the commit)
    # lets no other writer take a number meanwhile, so a search index that has read up to
    # N never misses a later commit below N, however many hosts write.
    "CREATE SEQUENCE embeddings_seq_numbers",
    """CREATE FUNCTION embeddings_seq() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(109317276565507);
        NEW.seq := nextval('embeddings_seq_numbers');
        RETURN NEW;
    END $$""",
    "CREATE TRIGGER embeddings_seq BEFORE INSERT OR UPDATE OF vector, model_id ON embeddings "
    "FOR EACH ROW EXECUTE FUNCTION embeddings_seq()",
]
PG_DROP = [
    "DROP TRIGGER embeddings_seq ON embeddings",
    "DROP FUNCTION embeddings_seq",
    "DROP SEQUENCE embeddings_seq_numbers",
    "DROP TRIGGER label_counts_tag_added ON tags",
    "DROP TRIGGER label_counts_tag_removed ON tags",
    "DROP TRIGGER label_counts_photo_status ON photos",
    "DROP TRIGGER label_counts_photo_deleted ON photos",
    "DROP FUNCTION label_counts_tags_added",
    "DROP FUNCTION label_counts_tags_removed",
    "DROP FUNCTION label_counts_photos",
]

TRIGGER_NAMES = [
    "label_counts_tag_added", "label_counts_tag_removed", "label_counts_photo_shown",
    "label_counts_photo_hidden", "label_counts_photo_deleted",
]  # fmt: skip


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
        sa.Column("seq", BigInt, nullable=True),
    )
    op.create_index("ix_embeddings_model_id", "embeddings", ["model_id"])
    op.create_index("ix_embeddings_seq", "embeddings", ["seq"])
    # Every embedding written gets the next number, so a search index kept beside the
    # database reads only what changed since it was last brought up to date.
    postgresql = op.get_bind().dialect.name == "postgresql"
    for event in () if postgresql else ("INSERT", "UPDATE OF vector, model_id"):
        name = "embeddings_seq_" + event.split()[0].lower()
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON embeddings BEGIN "
            "UPDATE embeddings SET seq = (SELECT coalesce(max(seq), 0) + 1 FROM embeddings) "
            "WHERE photo_id = NEW.photo_id; END"
        )
    op.create_table(
        "label_sets",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("digest", sa.Text(), nullable=False),
    )
    # A photo waiting to be encoded again by a new model keeps its old tags meanwhile.
    op.execute("DROP VIEW photo_tags")
    op.execute(VIEW.format("'tagged', 'stale'"))
    op.create_table(
        "label_counts",
        sa.Column("label_set", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("label_set", "label"),
    )
    op.execute(
        "INSERT INTO label_counts (label_set, label, count) "
        "SELECT tags.label_set, tags.label, count(*) FROM tags "
        f"JOIN photos ON photos.id = tags.photo_id WHERE photos.status IN {SHOWN} "
        "GROUP BY tags.label_set, tags.label"
    )
    for trigger in PG_TRIGGERS if postgresql else TRIGGERS:
        op.execute(trigger)
    # Covering, in score order: a one-tag query at a million photos reads only this index
    # and the matching photos' rows.
    op.drop_index("ix_tags_label_set_score", "tags")
    op.create_index("ix_tags_label_score", "tags", ["label", "score", "label_set", "photo_id"])


def downgrade() -> None:
    op.drop_index("ix_tags_label_score", "tags")
    op.create_index("ix_tags_label_set_score", "tags", ["label", "label_set", "score"])
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in PG_DROP if postgresql else [f"DROP TRIGGER {n}" for n in TRIGGER_NAMES]:
        op.execute(statement)
    op.drop_table("label_counts")
    op.execute("DROP VIEW photo_tags")
    op.execute(VIEW.format("'tagged'"))
    op.drop_table("label_sets")
    if not postgresql:
        op.execute("DROP TRIGGER embeddings_seq_insert")
        op.execute("DROP TRIGGER embeddings_seq_update")
    op.drop_index("ix_embeddings_seq", "embeddings")
    op.drop_index("ix_embeddings_model_id", "embeddings")
    op.drop_table("embeddings")
