"""The tables of the tag database (SQLAlchemy 2.0 typed models).

The schema is meant to be read without cliptagd too: `photos`, `tags` (what the model
computed), `decisions` (what people decided), and the view `photo_tags` (path, label_set,
label, score, tagged_at, decided: the tags shown, decisions applied; see migration 0006) for
sqlite3, Datasette or pandas.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Status(StrEnum):
    PENDING = "pending"
    TAGGED = "tagged"
    FAILED = "failed"
    # The file is gone. The row and its tags are kept for a while, out of every query, so a
    # photo that reappears elsewhere (a move no event reported) keeps its tags.
    DELETED = "deleted"
    # Tagged by another model than the configured one: queued to be encoded again, and
    # still in the queries with its old tags meanwhile.
    STALE = "stale"


# Photos whose tags the queries show.
VISIBLE = (Status.TAGGED, Status.STALE)


# 64-bit integers: file sizes beyond 2 GiB (videos), nanosecond times, ids of tables that
# churn. SQLite's INTEGER is 64-bit already (and an INTEGER primary key is its row id).
BigInt = BigInteger().with_variant(Integer(), "sqlite")

# Paths compare and sort byte by byte, as SQLite's text does, whatever the PostgreSQL
# database's locale; "C" also lets a folder-prefix LIKE use the index.
PathText = Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")


class Base(DeclarativeBase):
    pass


class Photo(Base):
    __tablename__ = "photos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Valid text for people and SQL; `raw_path` holds the exact bytes of the few names that
    # are not valid UTF-8 (see paths.py).
    path: Mapped[str] = mapped_column(PathText, unique=True)
    raw_path: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    size: Mapped[int] = mapped_column(BigInt)
    # Seconds since the epoch, as os.stat gives it; with size, tells an unchanged file.
    mtime: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=Status.PENDING)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A photo whose decoding failed in a way that may pass is not tried again before this.
    retry_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    model_id: Mapped[str | None] = mapped_column(Text, default=None)
    queued_at: Mapped[datetime] = mapped_column(DateTime)
    tagged_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    # jobs.fingerprint of the file as it was tagged: recognises it under another path.
    fingerprint: Mapped[str | None] = mapped_column(Text, default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    # What a failed photo failed under (decoders, limits, model): when that changes, it is
    # tried again.
    failed_with: Mapped[str | None] = mapped_column(Text, default=None)
    # On a database several hosts share (PostgreSQL): the host that claimed it, and until
    # when (the database's clock, UTC); another host may claim it once that has passed.
    claimed_by: Mapped[str | None] = mapped_column(Text, default=None)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, default=None)
    # The host that could not open the file (its mount, its permissions): another host
    # tries it before it is failed.
    unopened_on: Mapped[str | None] = mapped_column(Text, default=None)
    # photo or video (jobs.kind_of: by extension); `query --kind`.
    kind: Mapped[str] = mapped_column(String(8), default="photo", server_default="photo")
    # The folder and stem a file shares with the other files of its pair (pairs.stem_prefix:
    # "folder/IMG_1."), NULL for a file never paired; and a RAW file's or a Live Photo
    # video's still: its tags are that photo's, copied.
    pair_stem: Mapped[str | None] = mapped_column(PathText, default=None)
    pair_of: Mapped[int | None] = mapped_column(Integer, default=None)

    __table_args__ = (
        Index("ix_photos_status", "status"),
        Index("ix_photos_size", "size"),
        Index("ix_photos_pair_stem", "pair_stem"),
        Index("ix_photos_pair_of", "pair_of"),
    )


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(BigInt, primary_key=True)
    # A photo's tags go with its row (ON DELETE CASCADE; foreign keys are on, see sqlite.py).
    photo_id: Mapped[int] = mapped_column(ForeignKey("photos.id", ondelete="CASCADE"))
    label_set: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        UniqueConstraint("photo_id", "label_set", "label", name="uq_tags_photo_set_label"),
        # `query --tag` looks up by label, in score order; covering, so neither the tags
        # table nor a sort is needed (migration 0003).
        Index("ix_tags_label_score", "label", "score", "label_set", "photo_id"),
    )


class Embedding(Base):
    """A photo's L2-normalised image embedding as float16 bytes, and the model that made it:
    new questions (label sets, text searches) are answered without reading the photo."""

    __tablename__ = "embeddings"

    photo_id: Mapped[int] = mapped_column(
        ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(Text, index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    # Set by a trigger on every write: what changed since a search index was refreshed.
    seq: Mapped[int | None] = mapped_column(BigInt, index=True, default=None)


class LabelSetDigest(Base):
    """What each label set's tags were computed with (model and set config, hashed), so the
    sets changed since are re-tagged and no others."""

    __tablename__ = "label_sets"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    digest: Mapped[str] = mapped_column(Text)


class LabelTotal(Base):
    """How many shown photos carry each label: kept exact by triggers (migration 0003)."""

    __tablename__ = "label_counts"

    label_set: Mapped[str] = mapped_column(Text, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)


class Action(StrEnum):
    ADDED = "added"
    REMOVED = "removed"


class Decision(Base):
    """A person's decision on one tag of one photo: added or removed, from the CLI, the web
    page, or a keyword removed from a sidecar. Kept apart from the computed `tags`, so a
    re-tag or a re-encode never undoes it; the reader applies it (store/reader.py). One row
    per photo, set and label: a later decision replaces an earlier one."""

    __tablename__ = "decisions"

    photo_id: Mapped[int] = mapped_column(
        ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True
    )
    label_set: Mapped[str] = mapped_column(Text, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    action: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(16))
    # An added label of a single-label set takes the place of the computed one.
    replaces: Mapped[bool] = mapped_column(Boolean, default=False)
    decided_at: Mapped[datetime] = mapped_column(DateTime)


class SidecarOutbox(Base):
    """Photos whose XMP sidecar must be written: filled in the same transaction as the tags
    or decisions that call for it, drained by one writer (sidecars.py), so a crash between
    the commit and the file write loses nothing and a slow disk never holds the database."""

    __tablename__ = "sidecar_outbox"

    photo_id: Mapped[int] = mapped_column(
        ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True
    )
    queued_at: Mapped[datetime] = mapped_column(DateTime)


class Sidecar(Base):
    """What cliptagd last wrote into one XMP sidecar: its size and mtime then (a difference
    means someone else changed it), the keywords cliptagd added (the only ones it ever
    removes), whether cliptagd created the file, and the problem that keeps it from writing."""

    __tablename__ = "sidecars"

    path: Mapped[str] = mapped_column(PathText, primary_key=True)
    raw_path: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    # The photo it was last written for: a sidecar that moved with its photo is recognised.
    photo_id: Mapped[int | None] = mapped_column(Integer, index=True, default=None)
    size: Mapped[int | None] = mapped_column(BigInt, default=None)
    mtime_ns: Mapped[int | None] = mapped_column(BigInt, default=None)
    created: Mapped[bool] = mapped_column(Boolean, default=False)
    owned: Mapped[str] = mapped_column(Text, default="{}")  # xmp.Owned as JSON
    problem: Mapped[str | None] = mapped_column(Text, default=None)
    # Times a tool rewrote it without cliptagd's namespace (its keywords were put back).
    restored: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Retag(Base):
    """Each re-tag from stored embeddings, finished or failed, for `cliptagd status`: the
    daemon's worker runs them at start, out of sight of whoever changed the config."""

    __tablename__ = "retags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    message: Mapped[str] = mapped_column(Text)


class Host(Base):
    """A cliptagd process on a shared database: its role, when it was last seen, the tagging
    config it runs (model and label-set digests) and, if it waits, why (`status`)."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    role: Mapped[str] = mapped_column(String(8))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    seen_at: Mapped[datetime] = mapped_column(DateTime)
    config: Mapped[str | None] = mapped_column(Text, default=None)
    waiting: Mapped[str | None] = mapped_column(Text, default=None)
    tagged: Mapped[int] = mapped_column(Integer, default=0)


class Setting(Base):
    """Facts of the whole database: `tagging` is the tagging config every tag host must run
    (JSON: the model and each label set's digest)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)
