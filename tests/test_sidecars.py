"""XMP sidecars as the daemon keeps them: written after tagging, decisions and moves, merged
into what people and their photo managers put there, never clobbered, problems reported.

Most tests drive the real store and the real sidecar writer over real files (the tags come
from saved results, so no model is needed); the ones marked `slow` read the sidecars with
exiftool and exiv2, and run the real daemon and CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cliptagd import api, xmp
from cliptagd.config import Config, ConfigError, load_config
from cliptagd.jobs import FileStat, Outcome, TagScore
from cliptagd.scanner import PathFilter
from cliptagd.sidecars import SidecarWriter
from cliptagd.store import Store, TagQuery
from tests.helpers import (
    Daemon,
    cliptagd,
    cliptagd_in_process,
    file_modes_enforced,
    pictures,
    rows,
    wait_for,
)

needs_exiftool = pytest.mark.skipif(
    shutil.which("exiftool") is None or shutil.which("exiv2") is None,
    reason="exiftool and exiv2 are not installed (Debian: libimage-exiftool-perl, exiv2)",
)

SETS = {
    "scene": {"mode": "single", "labels": ["beach", "city", "forest"]},
    "things": {"mode": "multi", "labels": ["dog", "cat"]},
}


def make_config(tmp_path: Path, photos: Path, **xmp_options: Any) -> Config:
    sets = xmp_options.pop("sets", SETS)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "watch": {"paths": [str(photos)]},
                "database": {"url": f"sqlite:///{tmp_path / 'tags.db'}"},
                "label_sets": sets,
                "xmp": {"write": True, **xmp_options},
            }
        )
    )
    return load_config(path)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder


@pytest.fixture
def config(tmp_path: Path, photos: Path) -> Config:
    return make_config(tmp_path, photos)


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    with Store.open(config.database.url, sidecars=True) as store:
        yield store


def tag(store: Store, *photos: tuple[Path, list[tuple[str, str, float]]]) -> None:
    """Tag these photos as the worker would: files made, queued, claimed, results saved."""
    for path, _ in photos:
        if not path.exists():
            path.write_bytes(b"not decoded here")
    store.enqueue(FileStat.of(path) for path, _ in photos)
    jobs = {job.path: job for job in store.claim(100)}
    outcomes = [
        Outcome(jobs[str(path)], tags=tuple(TagScore(*t) for t in tags)) for path, tags in photos
    ]
    store.save_results(outcomes, "tiny-model", 3)


def user_sidecar(path: Path, flat: list[str] = (), hierarchical: list[str] = ()) -> None:  # type: ignore[assignment]
    """A sidecar as a photo manager leaves it: the user's keywords and a rating."""

    def bag(items: list[str]) -> str:
        return "".join(f"<rdf:li>{item}</rdf:li>" for item in items)

    path.write_text(
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:lr="http://ns.adobe.com/lightroom/1.0/" xmp:Rating="4">\n'
        f"<dc:subject><rdf:Bag>{bag(flat)}</rdf:Bag></dc:subject>\n"
        f"<lr:hierarchicalSubject><rdf:Bag>{bag(hierarchical)}</rdf:Bag>"
        "</lr:hierarchicalSubject>\n"
        "</rdf:Description></rdf:RDF></x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    )


def keywords(sidecar: Path) -> tuple[set[str], set[str], set[str]]:
    snapshot = xmp.read(str(sidecar))
    return set(snapshot.flat), set(snapshot.hierarchical), set(snapshot.tags_list)


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def drop_keyword(sidecar: Path, keyword: str) -> None:
    """Take one rdf:li out of the sidecar's text, as a photo manager saving it would."""
    text = sidecar.read_text()
    edited = re.sub(rf"\s*<rdf:li>{re.escape(keyword)}</rdf:li>", "", text)
    assert edited != text
    sidecar.write_text(edited)


def ids(store: Store, *paths: Path) -> list[int]:
    found = store.photo_ids([str(p) for p in paths])
    return [found[str(p)] for p in paths]


BEACH_DOG = [("scene", "beach", 0.9), ("things", "dog", 0.7)]


def tagged_and_written(
    store: Store, config: Config, photos: Path
) -> tuple[Path, Path, SidecarWriter]:
    """IMG_1.jpg tagged beach and dog, its sidecar written: the photo, sidecar and writer."""
    photo = photos / "IMG_1.jpg"
    tag(store, (photo, BEACH_DOG))
    writer = SidecarWriter(store, config)
    writer.drain_all()
    return photo, photos / "IMG_1.jpg.xmp", writer


def test_a_tagged_photo_gets_a_sidecar_written_once(
    store: Store, config: Config, photos: Path
) -> None:
    photo = photos / "IMG_1.jpg"
    photo.write_bytes(b"jpeg")
    photo.chmod(0o640)
    tag(store, (photo, BEACH_DOG))
    writer = SidecarWriter(store, config)
    assert writer.drain_all() == 1
    sidecar = photos / "IMG_1.jpg.xmp"
    assert keywords(sidecar) == (
        {"beach", "dog"},
        {"cliptagd|scene|beach", "cliptagd|things|dog"},
        {"cliptagd/scene/beach", "cliptagd/things/dog"},
    )
    assert sidecar.stat().st_mode & 0o777 == 0o640  # the photo's bits
    # Nothing changed: nothing queued, and a forced pass does not rewrite the file.
    before = stamp(sidecar)
    assert writer.drain_all() == 0
    store.queue_sidecars()
    writer.drain_all()
    assert stamp(sidecar) == before
    assert api.status(store).sidecars == {"written": 1, "waiting": 0, "restored": 0, "problems": 0}


def test_a_keyword_removed_in_a_photo_manager_becomes_a_decision(
    store: Store, config: Config, photos: Path
) -> None:
    photo, sidecar, writer = tagged_and_written(store, config, photos)
    drop_keyword(sidecar, "dog")  # the flat one only: the hierarchical ones go by themselves
    assert writer.check() == 1
    writer.drain_all()
    assert keywords(sidecar) == ({"beach"}, {"cliptagd|scene|beach"}, {"cliptagd/scene/beach"})
    assert store.decisions_for([str(photo)]) == [
        (str(photo), "things", "dog", "removed", "sidecar")
    ]
    assert store.query(TagQuery(tags=("dog",))) == []
    # A re-encode computes dog again: it stays gone.
    store.enqueue([FileStat(str(photo), 99, 1.0)])
    (job,) = store.claim(1)
    store.save_results([Outcome(job, tags=(TagScore("things", "dog", 0.99),))], "m", 3)
    writer.drain_all()
    assert "dog" not in keywords(sidecar)[0]
    # Clearing the decision brings it back, and it is cliptagd's again.
    api.clear_decisions(store, config, source="sidecar")
    writer.drain_all()
    assert "dog" in keywords(sidecar)[0]
    assert store.query(TagQuery(tags=("dog",)))[0].path == str(photo)


def test_every_keyword_removed_is_every_tag_rejected_while_the_namespace_stays(
    store: Store, config: Config, photos: Path
) -> None:
    photo, sidecar, writer = tagged_and_written(store, config, photos)
    for keyword in ("beach", "dog"):
        drop_keyword(sidecar, keyword)
    writer.check()
    writer.drain_all()
    assert keywords(sidecar) == (set(), set(), set())
    assert xmp.read(str(sidecar)).has_namespace
    assert store.tags_for([str(photo)]) == []


def test_a_sidecar_rewritten_without_cliptagds_namespace_gets_its_keywords_back(
    store: Store, config: Config, photos: Path
) -> None:
    photo, sidecar, writer = tagged_and_written(store, config, photos)
    # A tool that writes the sidecar from its own database (darktable does), knowing nothing
    # of cliptagd's keywords: a fresh packet with the user's rating only.
    user_sidecar(sidecar)
    assert not xmp.read(str(sidecar)).has_namespace
    writer.check()
    writer.drain_all()
    assert keywords(sidecar)[0] == {"beach", "dog"}
    assert store.decisions_for([str(photo)]) == []
    assert api.status(store).sidecars["restored"] == 1


def test_a_keyword_the_user_had_is_never_removed(
    store: Store, config: Config, photos: Path
) -> None:
    photo = photos / "IMG_1.jpg"
    sidecar = photos / "IMG_1.jpg.xmp"
    user_sidecar(sidecar, ["dog"], ["mine|dog"])
    tag(store, (photo, BEACH_DOG))
    writer = SidecarWriter(store, config)
    writer.drain_all()
    assert keywords(sidecar)[0] == {"beach", "dog"}
    # The model no longer sees a dog: cliptagd's hierarchical keyword goes, the user's
    # flat "dog" stays.
    api.decide(store, config, "remove", "things", "dog", [photo])
    writer.drain_all()
    flat, hierarchical, _ = keywords(sidecar)
    assert flat == {"beach", "dog"}
    assert hierarchical == {"mine|dog", "cliptagd|scene|beach"}
    # And a clean uninstall leaves it too; the file was the user's, so it stays.
    assert writer.strip().stripped == 1
    assert keywords(sidecar) == ({"dog"}, {"mine|dog"}, set())
    assert 'xmp:Rating="4"' in sidecar.read_text()
    assert not xmp.read(str(sidecar)).has_namespace


def test_cli_decisions_reach_queries_counts_view_and_sidecar(
    store: Store, config: Config, photos: Path, tmp_path: Path
) -> None:
    a, b = photos / "a.jpg", photos / "b.jpg"
    tag(store, (a, BEACH_DOG), (b, [("scene", "city", 0.8)]))
    config_file = tmp_path / "config.yaml"

    def run(*args: object) -> Any:
        result = cliptagd_in_process(*args)
        assert result.exit_code == 0, result.output
        return result

    # No daemon runs: the command writes the sidecars itself.
    run("tag", "remove", "-c", config_file, "--set", "things", "--label", "dog", a)
    run("tag", "add", "-c", config_file, "--set", "scene", "--label", "beach", b)
    out = json.loads(run("query", "-c", config_file, "--tag", "beach", "--format", "json").output)
    assert [(row["path"], row["score"], row["by"]) for row in out] == [
        (str(b), 1.0, "you"),
        (str(a), 0.9, "model"),
    ]
    assert (
        json.loads(run("query", "-c", config_file, "--tag", "dog", "--format", "json").output) == []
    )
    labels = json.loads(run("labels", "-c", config_file, "--format", "json").output)
    assert {(r["label"], r["count"]) for r in labels} == {("beach", 2)}
    assert keywords(photos / "a.jpg.xmp")[0] == {"beach"}
    assert keywords(photos / "b.jpg.xmp")[0] == {"beach"}  # city replaced: a single set
    # An unknown label is refused with the closest names.
    result = cliptagd_in_process(
        "tag", "add", "-c", config_file, "--set", "scene", "--label", "beech", b
    )
    assert result.exit_code == 1 and "'beach'" in result.output
    run("tag", "clear", "-c", config_file, a, b)
    assert keywords(photos / "b.jpg.xmp")[0] == {"city"}
    assert keywords(photos / "a.jpg.xmp")[0] == {"beach", "dog"}


def test_replace_naming_shares_one_sidecar_per_stem(tmp_path: Path, photos: Path) -> None:
    config = make_config(tmp_path, photos, naming="replace")
    with Store.open(config.database.url, sidecars=True) as store:
        # Not a pair (a pair has one photo's tags): two photos that share a stem.
        tiff, jpeg = photos / "IMG_2.tif", photos / "IMG_2.jpg"
        tag(store, (tiff, [("scene", "beach", 0.6)]), (jpeg, [("things", "cat", 0.8)]))
        SidecarWriter(store, config).drain_all()
    assert sorted(p.name for p in photos.glob("*.xmp")) == ["IMG_2.xmp"]
    assert keywords(photos / "IMG_2.xmp")[0] == {"beach", "cat"}


def test_a_raw_and_jpeg_pair_has_one_sidecar(tmp_path: Path, photos: Path) -> None:
    config = make_config(tmp_path, photos, naming="replace")
    with Store.open(config.database.url, sidecars=True) as store:
        raw, jpeg = photos / "IMG_4.dng", photos / "IMG_4.jpg"
        raw.write_bytes(b"not decoded here")
        store.enqueue([FileStat.of(raw)])
        # Only the JPEG is tagged; the RAW file takes its tags (and its sidecar is the same).
        tag(store, (jpeg, [("scene", "beach", 0.6)]))
        SidecarWriter(store, config).drain_all()
        assert [(r.label_set, r.label) for r in store.tags_for([str(raw)])] == [("scene", "beach")]
    assert sorted(p.name for p in photos.glob("*.xmp")) == ["IMG_4.xmp"]
    assert keywords(photos / "IMG_4.xmp")[0] == {"beach"}


def test_a_sidecar_of_the_other_naming_is_used(store: Store, config: Config, photos: Path) -> None:
    lightroom = photos / "IMG_3.xmp"
    user_sidecar(lightroom)
    tag(store, (photos / "IMG_3.jpg", BEACH_DOG))
    SidecarWriter(store, config).drain_all()
    assert not (photos / "IMG_3.jpg.xmp").exists()
    assert keywords(lightroom)[0] == {"beach", "dog"}


def test_a_sidecar_that_moved_with_its_photo_is_recognised(
    store: Store, config: Config, photos: Path
) -> None:
    photo, _, writer = tagged_and_written(store, config, photos)
    album = photos / "album"
    album.mkdir()
    # Moved together, as photo managers do: the sidecar is still cliptagd's (a removal
    # noticed there becomes a decision).
    os.rename(photo, album / photo.name)
    os.rename(photos / "IMG_1.jpg.xmp", album / "IMG_1.jpg.xmp")
    store.move(str(photo), str(album / photo.name))
    writer.drain_all()
    assert [r.path for r in store.sidecars_under()] == [str(album / "IMG_1.jpg.xmp")]
    drop_keyword(album / "IMG_1.jpg.xmp", "dog")
    writer.check()
    writer.drain_all()
    assert store.decisions_for([str(album / photo.name)])[0][2:] == ("dog", "removed", "sidecar")
    # Moved alone: a new sidecar beside it; the one left behind is an orphan, left alone.
    os.rename(album / photo.name, photos / photo.name)
    store.move(str(album / photo.name), str(photo))
    writer.drain_all()
    assert keywords(photos / "IMG_1.jpg.xmp")[0] == {"beach"}
    assert (album / "IMG_1.jpg.xmp").exists()


def test_a_malformed_sidecar_is_reported_and_never_overwritten(
    store: Store, config: Config, photos: Path
) -> None:
    sidecar = photos / "IMG_1.jpg.xmp"
    sidecar.write_text("<x:xmpmeta this is not xml")
    tag(store, (photos / "IMG_1.jpg", BEACH_DOG))
    writer = SidecarWriter(store, config)
    writer.drain_all()
    assert sidecar.read_text() == "<x:xmpmeta this is not xml"
    report = api.status(store)
    assert report.sidecars["problems"] == 1
    assert report.sidecar_problems[0].path == str(sidecar)
    assert store.query(TagQuery(tags=("dog",)))  # the tags stay in the database
    # Fixed by hand: the next rescan sees it and writes.
    sidecar.unlink()
    assert writer.check() == 1
    writer.drain_all()
    assert keywords(sidecar)[0] == {"beach", "dog"}
    assert api.status(store).sidecars["problems"] == 0


def test_a_read_only_folder_is_reported(store: Store, config: Config, photos: Path) -> None:
    tag(store, (photos / "IMG_1.jpg", BEACH_DOG))
    photos.chmod(0o555)
    try:
        with file_modes_enforced():
            SidecarWriter(store, config).drain_all()
    finally:
        photos.chmod(0o755)
    assert not (photos / "IMG_1.jpg.xmp").exists()
    (problem,) = api.status(store).sidecar_problems
    assert "ermission denied" in problem.problem


def test_remove_deletes_only_sidecars_cliptagd_created(
    store: Store, config: Config, photos: Path
) -> None:
    tag(store, (photos / "a.jpg", BEACH_DOG))
    SidecarWriter(store, config).drain_all()
    report = api.remove_sidecars(store, config)
    assert (report.deleted, report.stripped, report.problems) == (1, 0, 0)
    assert list(photos.glob("*.xmp")) == []
    assert list(store.sidecars_under()) == []


def test_sidecars_are_never_photos(tmp_path: Path, photos: Path) -> None:
    config = make_config(tmp_path, photos)
    path_filter = PathFilter(config.watch.paths, config.watch.extensions, config.watch.exclude)
    for name in ("IMG_1.jpg.xmp", "IMG_1.xmp", ".IMG_1.jpg.xmp.cliptagd-x1y2.tmp"):
        assert not path_filter.wanted(str(photos / name))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"watch": {"paths": [str(photos)], "extensions": ["jpg", "xmp"]},
                        "label_sets": SETS})
    )  # fmt: skip
    with pytest.raises(ConfigError, match="sidecars, never photos"):
        load_config(bad)


# -- real readers, the real daemon ------------------------------------------------------------


def exiftool(*args: str | Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["exiftool", "-j", "-G1", "-struct", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout or "[]")


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@pytest.mark.slow
@pytest.mark.e2e
@needs_exiftool
def test_the_daemon_writes_sidecars_exiftool_reads_and_honours_removals(
    make_config: Any, photo_dir: Path, rng: Any, tmp_path: Path
) -> None:
    """A new user turns xmp.write on and runs the daemon; exiftool sees the tags; a keyword
    removed with exiftool stays removed through a re-tag; removing cliptagd's keywords and
    namespace (a rewrite by another tool) brings them back, and status counts it."""
    config = make_config(xmp={"write": True}, watch={"paths": [str(photo_dir)],
                                                      "settle_seconds": 0.5,
                                                      "rescan_minutes": 0.05})  # fmt: skip
    photos = pictures(photo_dir, 4, rng)
    db = tmp_path / "tags.db"
    with Daemon(config) as daemon:
        sidecars = [Path(f"{p}.xmp") for p in photos]
        wait_for(lambda: all(s.exists() for s in sidecars), 120, "the sidecars")
        tagged_at = rows(db, "SELECT path, tagged_at FROM photos ORDER BY path")
        found = {Path(r["SourceFile"]): r for r in exiftool(*sidecars)}
        for photo, colour in photos.items():
            record = found[Path(f"{photo}.xmp")]
            assert as_list(record["XMP-dc:Subject"]) == [colour]
            assert as_list(record["XMP-lr:HierarchicalSubject"]) == [f"cliptagd|colour|{colour}"]
            assert as_list(record["XMP-digiKam:TagsList"]) == [f"cliptagd/colour/{colour}"]
        first, colour = next(iter(photos.items()))
        side = Path(f"{first}.xmp")
        subprocess.run(
            ["exiftool", "-q", "-overwrite_original", f"-XMP-dc:Subject-={colour}",
             f"-XMP-lr:HierarchicalSubject-=cliptagd|colour|{colour}", str(side)],
            check=True, timeout=60,
        )  # fmt: skip

        def dropped() -> bool:
            rows = cliptagd("query", "-c", config, "--tag", colour, "--format", "paths").stdout
            return str(first) not in rows

        wait_for(dropped, 60, "the removal to be noticed at a rescan")
        cliptagd("retag", "-c", config, "--all")
        assert dropped()
        # Another tool rewrites the sidecar without cliptagd's keywords and namespace.
        others = [p for p in photos if p != first]
        other = others[0]
        subprocess.run(
            ["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject=",
             "-XMP-lr:HierarchicalSubject=", "-XMP-digiKam:TagsList=", "-XMP-cliptagd:all=",
             "-XMP-xmp:Rating=3", f"{other}.xmp"],
            check=True, timeout=60,
        )  # fmt: skip
        wait_for(lambda: exiftool(f"{other}.xmp")[0].get("XMP-dc:Subject"), 60, "the keywords back")
        assert exiftool(f"{other}.xmp")[0]["XMP-xmp:Rating"] == 3
        status = json.loads(cliptagd("status", "-c", config, "--format", "json").stdout)
        assert status["sidecars"]["restored"] == 1
        assert daemon.stop() == 0
    # Its own sidecar writes (and the rescans that saw them) never made a photo be tagged
    # again.
    assert rows(db, "SELECT path, tagged_at FROM photos ORDER BY path") == tagged_at
    exiv2 = subprocess.run(
        ["exiv2", "-P", "kv", "-K", "Xmp.dc.subject", str(Path(f"{others[1]}.xmp"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert photos[others[1]] in exiv2.stdout


def test_a_photo_manager_saving_at_the_same_moment_is_merged_not_overwritten(
    store: Store, config: Config, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = photos / "IMG_1.jpg"
    sidecar = photos / "IMG_1.jpg.xmp"
    user_sidecar(sidecar, ["holiday"])
    tag(store, (photo, BEACH_DOG))
    real_write = xmp.write
    saves = []

    def racing_write(snapshot: xmp.Snapshot, data: bytes, *, like: str) -> tuple[int, int]:
        if not saves:  # the person saves once, between cliptagd's read and its write
            user_sidecar(sidecar, ["holiday", "family"])
            os.utime(sidecar, ns=(1, 1))
            saves.append(sidecar.stat().st_mtime_ns)
        return real_write(snapshot, data, like=like)

    monkeypatch.setattr(xmp, "write", racing_write)
    SidecarWriter(store, config).drain_all()
    assert keywords(sidecar)[0] == {"holiday", "family", "beach", "dog"}
    assert 'xmp:Rating="4"' in sidecar.read_text()
