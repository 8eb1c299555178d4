"""What cliptagd's results look like as JSON: one shape for the command line's
`--format json|csv|table` and the web app's API, so the two always agree."""

from __future__ import annotations

import base64
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .paths import display
from .store import TagRow

if TYPE_CHECKING:
    from .api import StatusReport

TAG_COLUMNS = ["path", "set", "label", "score", "by"]


def tag_record(row: TagRow) -> dict[str, Any]:
    """A tag of a photo; `by` is "you" for a tag a person added (`cliptagd tag add`), else
    "model". `path` as open() takes it (see `with_raw_path` for printing)."""
    return {
        "path": row.path,
        "set": row.label_set,
        "label": row.label,
        "score": round(row.score, 4),
        "by": "you" if row.decided else "model",
    }


def with_raw_path(record: dict[str, Any]) -> dict[str, Any]:
    """`path` as text for people and programs; a file name that is not valid UTF-8 also
    comes as its exact bytes, base64-encoded, in `path_b64`."""
    path = record["path"]
    text = display(path)
    if text == path:
        return record
    raw = base64.b64encode(os.fsencode(path)).decode("ascii")
    return {**record, "path": text, "path_b64": raw}


def status_record(report: StatusReport) -> dict[str, Any]:
    """`cliptagd status --format json`, and the web API's /api/status."""
    body: dict[str, Any] = {s.value: n for s, n in report.counts.items()}
    body["failures"] = [with_raw_path(asdict(f)) for f in report.failures]
    last = report.last_retag
    body["last_retag"] = (
        {"finished_at": f"{last.finished_at.isoformat()}Z", "ok": last.ok, "message": last.message}
        if last
        else None
    )
    body["sidecars"] = {k: v for k, v in report.sidecars.items() if k != "problems"}
    body["sidecar_problems"] = report.sidecars.get("problems", 0)
    body["sidecar_problem_paths"] = [
        with_raw_path({"path": p.path, "problem": p.problem}) for p in report.sidecar_problems
    ]
    body["unsupported"] = report.unsupported
    body["hosts"] = [
        {"name": h.name, "role": h.role, "seen_at": f"{h.seen_at.isoformat()}Z",
         "waiting": h.waiting}
        for h in report.hosts
    ]  # fmt: skip
    return body
