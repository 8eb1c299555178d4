"""The Python API: open the tag database read-only and run the queries the CLI runs.

    from cliptagd.api import TagQuery, open_database

    with open_database("~/.config/cliptagd/config.yaml") as db:
        for row in db.query(TagQuery(tags=("beach",), not_tags=("night",), limit=10)):
            print(row.path, row.label, row.score)
        print(db.labels())                      # [LabelCount(label_set, label, count), ...]
        print(db.tags_for(["/photos/a.jpg"]))   # [TagRow(path, label_set, label, score), ...]
        print(similar(db, "/photos/a.jpg"))     # [Match(path, score), ...]

Nothing here imports torch: it answers at once. Text search needs the model, see
`cliptagd search` (cliptagd.cli) for how it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import find_config, load_config
from .store import LabelCount, Store, StoreError, TagQuery, TagRow

if TYPE_CHECKING:
    from .search import Match

__all__ = [
    "LabelCount", "Store", "StoreError", "TagQuery", "TagRow", "open_database", "similar",
]  # fmt: skip


def open_database(config: str | Path | None = None, *, url: str | None = None) -> Store:
    """The tag database of a config file (found as the CLI finds it when None), or at a
    SQLAlchemy `url`, opened read-only. Raises ConfigError or StoreError."""
    if url is None:
        url = load_config(find_config(Path(config).expanduser() if config else None)).database.url
    store = Store(url, readonly=True)
    store.check_schema()
    return store


def similar(
    store: Store, path: str | Path, limit: int = 20, index_dir: Path | None = None
) -> list[Match]:
    """The photos that look most like the photo at `path` (itself left out), best first.
    `index_dir`: a folder to keep the search index in (much faster from the second search);
    None reads every embedding from the database."""
    from .search import nearest  # numpy: only for searches

    key = str(Path(path).expanduser().absolute())
    found = store.embedding_of(key)
    if found is None:
        raise StoreError(f"{key}: no stored embedding (not tagged yet?)")
    model_id, vector = found
    return nearest(store, model_id, vector, limit, exclude=key, index_dir=index_dir)
