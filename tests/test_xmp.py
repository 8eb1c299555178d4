"""XMP sidecars: keywords merged into real photo managers' files, read back by exiftool and
exiv2; hostile XML refused; files replaced only when safe.

exiftool and exiv2 are the readers that count, so the tests use them rather than only our
own parser: one fast smoke test writes a new sidecar and reads it with exiftool, the rest
that start those programs are marked slow. Permission cases drop root's override of file
modes (tests.helpers.file_modes_enforced), as the daemon runs unprivileged.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree  # type: ignore[import-untyped]

from cliptagd import xmp
from cliptagd.xmp import Keyword, Owned
from tests import xmp_samples
from tests.helpers import file_modes_enforced

EXIFTOOL = shutil.which("exiftool")
EXIV2 = shutil.which("exiv2")
needs_exiftool = pytest.mark.skipif(
    EXIFTOOL is None, reason="exiftool is not installed (apt-get install libimage-exiftool-perl)"
)
needs_exiv2 = pytest.mark.skipif(
    EXIV2 is None, reason="exiv2 is not installed (apt-get install exiv2)"
)

MODEL = "ViT-B-32/openai"
# The three keyword tags cliptagd writes, as exiftool names them.
KEYWORD_TAGS = ("XMP-dc:Subject", "XMP-lr:HierarchicalSubject", "XMP-digiKam:TagsList")


def keyword(label_set: str, label: str, score: float = 0.5) -> Keyword:
    return Keyword(label_set, label, score, f"cliptagd|{label_set}|{label}")


DOG = keyword("animals", "dog", 0.9123)
BEACH = keyword("scene", "beach", 0.5)
SUNSET = keyword("scene", "sunset", 0.25)
NOTHING = Owned()


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A photo (its bytes do not matter here), mode 0640."""
    path = tmp_path / "IMG_1.jpg"
    path.write_bytes(b"\xff\xd8\xff\xd9")
    path.chmod(0o640)
    return path


def sidecar_of(photo: Path, text: str | bytes | None = None) -> Path:
    """The photo's append-named sidecar, written with `text` when given."""
    path = Path(xmp.sidecar_path(str(photo), "append"))
    if text is not None:
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def merged(path: Path, keywords: list[Keyword], owned: Owned = NOTHING, *, photo: Path) -> Owned:
    """Read, merge, write (when it changed); return what cliptagd owns after."""
    snapshot = xmp.read(str(path))
    data, now_owned = xmp.merge(snapshot, keywords, owned, MODEL)
    if data is not None:
        xmp.write(snapshot, data, like=str(photo))
    return now_owned


def stripped(path: Path, owned: Owned) -> None:
    """Read, strip, write or delete."""
    snapshot = xmp.read(str(path))
    data = xmp.strip(snapshot, owned)
    if data == b"":
        xmp.delete(snapshot)
    elif data is not None:
        xmp.write(snapshot, data, like=str(path))  # unused: an existing sidecar keeps its mode


def canonical(data: str | bytes) -> bytes:
    """A document in canonical XML: what it says, whatever the quoting and spacing in tags."""
    raw = data.encode() if isinstance(data, str) else data
    return bytes(etree.tostring(etree.fromstring(raw), method="c14n"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def exiftool(*paths: Path) -> dict[str, dict[str, Any]]:
    """exiftool's full dump of each file, by file name, less the file system's own tags."""
    assert EXIFTOOL is not None
    result = subprocess.run(
        [EXIFTOOL, "-j", "-G1", "-a", "-struct", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return {
        Path(found.pop("SourceFile")).name: {
            tag: value
            for tag, value in found.items()
            if not tag.startswith("System:") and tag != "ExifTool:ExifToolVersion"
        }
        for found in json.loads(result.stdout)
    }


def exiv2(path: Path) -> dict[str, list[str]]:
    """exiv2's XMP keys of a standalone .xmp file and their values (lists split)."""
    assert EXIV2 is not None
    result = subprocess.run(
        [EXIV2, "-q", "-P", "kv", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key.startswith("Xmp."):
            found[key] = value.strip().split(", ")
    return found


def others(dump: dict[str, Any]) -> dict[str, Any]:
    """A dump without cliptagd's block and without the keyword tags."""
    return {
        tag: value
        for tag, value in dump.items()
        if not tag.startswith("XMP-cliptagd:") and tag not in KEYWORD_TAGS
    }


# -- paths -----------------------------------------------------------------------------------


def test_candidates_for_both_namings() -> None:
    assert xmp.candidates("/p/IMG_1.jpg", "append") == ("/p/IMG_1.jpg.xmp", "/p/IMG_1.xmp")
    assert xmp.candidates("/p/IMG_1.jpg", "replace") == ("/p/IMG_1.xmp", "/p/IMG_1.jpg.xmp")


def test_sidecar_path_takes_the_other_namings_file_when_only_it_exists(photo: Path) -> None:
    append, replace = str(photo) + ".xmp", str(photo.with_suffix(".xmp"))
    assert xmp.sidecar_path(str(photo), "append") == append
    assert xmp.sidecar_path(str(photo), "replace") == replace
    Path(replace).write_text("x")
    assert xmp.sidecar_path(str(photo), "append") == replace  # never a second sidecar
    assert xmp.sidecar_path(str(photo), "replace") == replace
    os.symlink("nowhere", append)  # a dangling link still takes the name
    assert xmp.sidecar_path(str(photo), "append") == append
    assert xmp.sidecar_path(str(photo), "replace") == replace


# -- values ----------------------------------------------------------------------------------


def test_keyword_forms() -> None:
    assert (DOG.flat, DOG.hierarchical, DOG.tags_list) == (
        "dog",
        "cliptagd|animals|dog",
        "cliptagd/animals/dog",
    )


def test_owned_round_trips_through_json_in_a_stable_form() -> None:
    owned = Owned(frozenset({"b", "a"}), frozenset({"x|b", "x|a"}), frozenset({"x/a"}))
    text = owned.to_json()
    assert json.loads(text) == {"flat": ["a", "b"], "hierarchical": ["x|a", "x|b"],
                                "tags_list": ["x/a"]}  # fmt: skip
    assert Owned.from_json(text) == owned
    assert Owned.from_json(None) == Owned() == Owned.from_json("")
    assert owned and not Owned()


# -- merge and strip -------------------------------------------------------------------------


def test_a_new_sidecar_is_a_standard_packet_and_merging_again_changes_nothing(
    photo: Path,
) -> None:
    path = sidecar_of(photo)
    owned = merged(path, [DOG, BEACH], photo=photo)
    assert owned == Owned(
        frozenset({"dog", "beach"}),
        frozenset({DOG.hierarchical, BEACH.hierarchical}),
        frozenset({DOG.tags_list, BEACH.tags_list}),
    )
    data = path.read_bytes()
    assert data.startswith('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'.encode())
    assert data.rstrip().endswith(b'<?xpacket end="w"?>')
    assert b"\n     <rdf:li>dog</rdf:li>\n" in data  # pretty-printed
    snapshot = xmp.read(str(path))
    assert snapshot.flat == {"dog", "beach"} and snapshot.has_namespace
    assert snapshot.tags_list == {"cliptagd/animals/dog", "cliptagd/scene/beach"}
    assert xmp.merge(snapshot, [DOG, BEACH], owned, MODEL) == (None, owned)


def test_no_sidecar_is_made_for_no_keywords(photo: Path) -> None:
    snapshot = xmp.read(str(sidecar_of(photo)))
    assert snapshot.data is None and not snapshot.has_namespace
    assert xmp.merge(snapshot, [], Owned(), MODEL) == (None, Owned())
    assert xmp.strip(snapshot, Owned()) is None


def test_a_keyword_the_person_had_is_not_owned_and_survives(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.LIGHTROOM)  # has "dog" already
    owned = merged(path, [DOG, BEACH], photo=photo)
    assert owned.flat == {"beach"}
    assert xmp.read(str(path)).flat == {"Paris", "dog", "beach"}
    owned = merged(path, [BEACH], owned, photo=photo)  # dog no longer wanted
    assert xmp.read(str(path)).flat == {"Paris", "dog", "beach"}
    stripped(path, owned)
    assert xmp.read(str(path)).flat == {"Paris", "dog"}
    assert canonical(path.read_bytes()) == canonical(xmp_samples.LIGHTROOM)


def test_new_entries_go_at_the_end_and_the_persons_order_is_kept(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.LIGHTROOM)
    merged(path, [BEACH, DOG, SUNSET], photo=photo)
    subjects = re.findall(r"<rdf:li>([^<]*)</rdf:li>", path.read_text().split("dc:subject")[1])
    assert subjects == ["Paris", "dog", "beach", "sunset"]


def test_new_scores_change_only_the_provenance_block(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    owned = merged(path, [DOG, BEACH], photo=photo)
    before = path.read_text().splitlines()
    owned = merged(path, [keyword("animals", "dog", 0.5), keyword("scene", "beach", 0.75)],
                   owned, photo=photo)  # fmt: skip
    after = path.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    score = "      <cliptagd:Score>{}</cliptagd:Score>".format
    assert changed == [(score("0.9123"), score("0.5000")), (score("0.5000"), score("0.7500"))]


def test_a_keyword_no_longer_wanted_removes_only_cliptagds_entries(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DIGIKAM)
    owned = merged(path, [DOG, BEACH], photo=photo)
    owned = merged(path, [BEACH], owned, photo=photo)
    snapshot = xmp.read(str(path))
    assert snapshot.flat == {"Alice", "beach"}
    assert snapshot.hierarchical == {"People|Alice", BEACH.hierarchical}
    assert snapshot.tags_list == {"People/Alice", BEACH.tags_list}
    assert owned == Owned(
        frozenset({"beach"}), frozenset({BEACH.hierarchical}), frozenset({BEACH.tags_list})
    )
    assert b"dog" not in path.read_bytes()


def test_no_keywords_keep_the_block_while_there_is_history_and_strip_removes_it(
    photo: Path,
) -> None:
    path = sidecar_of(photo, xmp_samples.DIGIKAM)
    owned = merged(path, [DOG], photo=photo)
    owned = merged(path, [], owned, photo=photo)
    assert owned == Owned()
    snapshot = xmp.read(str(path))
    assert snapshot.has_namespace and snapshot.flat == {"Alice"}
    assert b"<cliptagd:Model>" in snapshot.data  # type: ignore[operator]
    assert xmp.merge(snapshot, [], owned, MODEL) == (None, Owned())  # stable
    stripped(path, owned)
    assert canonical(path.read_bytes()) == canonical(xmp_samples.DIGIKAM)
    assert not xmp.read(str(path)).has_namespace


def test_strip_of_a_sidecar_only_cliptagd_filled_leaves_nothing(photo: Path) -> None:
    path = sidecar_of(photo)
    owned = merged(path, [DOG, BEACH], photo=photo)
    snapshot = xmp.read(str(path))
    assert xmp.strip(snapshot, owned) == b""
    # Had the person made the file, it would be kept: an empty packet, nothing of cliptagd.
    kept = xmp.strip(snapshot, owned, created=False)
    assert kept and b"xmpmeta" in kept and b"cliptagd:" not in kept and b"dog" not in kept
    xmp.delete(snapshot)
    assert not path.exists()


def test_entries_a_person_removed_are_reported_and_no_longer_owned(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    owned = merged(path, [DOG, BEACH], photo=photo)
    path.write_text(path.read_text().replace("<rdf:li>dog</rdf:li>", ""))  # by hand
    snapshot = xmp.read(str(path))
    assert xmp.missing(snapshot, owned) == Owned(flat=frozenset({"dog"}))
    _, now_owned = xmp.merge(snapshot, [BEACH], owned, MODEL)  # the caller stopped wanting it
    assert now_owned.flat == {"beach"}
    _, now_owned = xmp.merge(snapshot, [DOG, BEACH], owned, MODEL)  # wanted again: re-added
    assert now_owned.flat == {"dog", "beach"}


def test_keywords_go_in_the_first_description_declaring_their_namespaces(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)  # has dc and lr, not digiKam
    merged(path, [DOG], photo=photo)
    root = etree.fromstring(path.read_bytes())
    first = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    tags_list = first.find("{http://www.digikam.org/ns/1.0/}TagsList")
    assert tags_list is not None and tags_list.prefix == "digiKam"
    start_tag = re.search(rb"<rdf:Description [^>]*>", path.read_bytes())
    assert start_tag and b'xmlns:digiKam="http://www.digikam.org/ns/1.0/"' in start_tag[0]
    assert b"<digiKam:TagsList>\n    <rdf:Seq>\n     <rdf:li>" in path.read_bytes()


def test_cliptagds_block_moved_by_a_photo_manager_is_recognised_and_replaced_whole(
    photo: Path,
) -> None:
    # As the Adobe XMP toolkit rewrites a file: one description, every namespace on it.
    text = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:cliptagd="http://ns.cliptagd.org/xmp/1.0/"
   xmp:Rating="3">
   <cliptagd:Tags>
    <rdf:Bag>
     <rdf:li>
      <rdf:Description cliptagd:Score="0.9123" cliptagd:Label="dog" cliptagd:Set="animals"/>
     </rdf:li>
    </rdf:Bag>
   </cliptagd:Tags>
   <cliptagd:Model>ViT-B-32/openai</cliptagd:Model>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>dog</rdf:li>
    </rdf:Bag>
   </dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""
    path = sidecar_of(photo, text)
    owned = Owned(flat=frozenset({"dog"}))
    snapshot = xmp.read(str(path))
    assert snapshot.has_namespace
    owned = merged(path, [BEACH], owned, photo=photo)
    data = path.read_text()
    assert data.count("xmlns:cliptagd=") == 1 and data.count("<cliptagd:Model>") == 1
    main, block = data.split("</rdf:Description>")[:2]
    assert "cliptagd:" not in main and "xmp:Rating" in main and "<rdf:li>beach</rdf:li>" in main
    assert "<cliptagd:Label>beach</cliptagd:Label>" in block and "dog" not in block
    assert xmp.merge(xmp.read(str(path)), [BEACH], owned, MODEL) == (None, owned)
    stripped(path, owned)
    assert "cliptagd" not in path.read_text()
    assert xmp.read(str(path)).flat == frozenset() and "xmp:Rating" in path.read_text()


def test_a_single_value_or_attribute_form_becomes_a_list_keeping_its_value(photo: Path) -> None:
    text = """<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""
 xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
 lr:hierarchicalSubject="places|sea"><dc:subject>sea</dc:subject></rdf:Description>
</rdf:RDF></x:xmpmeta>"""
    path = sidecar_of(photo, text)
    snapshot = xmp.read(str(path))
    assert (snapshot.flat, snapshot.hierarchical) == ({"sea"}, {"places|sea"})
    owned = merged(path, [DOG], photo=photo)
    snapshot = xmp.read(str(path))
    assert snapshot.flat == {"sea", "dog"} and snapshot.hierarchical == {
        "places|sea",
        DOG.hierarchical,
    }
    stripped(path, owned)
    assert xmp.read(str(path)).flat == {"sea"}
    assert xmp.read(str(path)).hierarchical == {"places|sea"}


def test_a_keyword_property_that_is_a_structure_is_refused(photo: Path) -> None:
    text = """<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF
 xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about=""
 xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject rdf:parseType="Resource"/>
</rdf:Description></rdf:RDF></x:xmpmeta>"""
    with pytest.raises(xmp.Malformed, match="dc:subject is neither a list nor a single value"):
        xmp.read(str(sidecar_of(photo, text)))


def test_the_bytes_around_the_root_element_are_kept(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DIGIKAM)
    merged(path, [DOG], photo=photo)
    data = path.read_text()
    assert data.startswith(xmp_samples.DIGIKAM.split("<x:xmpmeta")[0])  # xpacket begin
    assert data.endswith(xmp_samples.DIGIKAM.split("</x:xmpmeta>")[1])  # padding, xpacket end
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    merged(path, [DOG], photo=photo)
    assert path.read_text().startswith('<?xml version="1.0" encoding="UTF-8"?>\n<x:xmpmeta')


def test_a_utf16_sidecar_stays_utf16(photo: Path) -> None:
    text = xmp_samples.DARKTABLE.replace('encoding="UTF-8"', 'encoding="UTF-16"')
    path = sidecar_of(photo, text.encode("utf-16"))
    owned = merged(path, [DOG], photo=photo)
    first_line = path.read_text("utf-16").splitlines()[0]
    assert first_line.startswith("<?xml") and "UTF-16" in first_line
    assert xmp.read(str(path)).flat == {"holiday", "dog"}
    stripped(path, owned)
    assert xmp.read(str(path)).flat == {"holiday"}


def test_an_empty_file_is_an_empty_sidecar(photo: Path) -> None:
    path = sidecar_of(photo, b"")
    snapshot = xmp.read(str(path))
    assert snapshot.data == b"" and snapshot.flat == frozenset()
    assert xmp.strip(snapshot, Owned()) is None
    merged(path, [DOG], photo=photo)
    assert xmp.read(str(path)).flat == {"dog"}


# -- hostile and broken files ----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_billion_laughs_is_refused_unexpanded(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.BILLION_LAUGHS)
    with pytest.raises(xmp.Malformed, match="DOCTYPE"):
        xmp.read(str(path))
    snapshot = xmp.Snapshot(str(path), path.read_bytes(), 1, 1, frozenset(), frozenset(),
                            frozenset(), False)  # fmt: skip
    with pytest.raises(xmp.Malformed):
        xmp.merge(snapshot, [DOG], Owned(), MODEL)
    with pytest.raises(xmp.Malformed):
        xmp.strip(snapshot, Owned())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("codec", ["utf-8", "utf-16"])
def test_an_external_entity_is_never_read(photo: Path, tmp_path: Path, codec: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-marker")
    text = xmp_samples.external_entity(secret.as_uri())
    if codec != "utf-8":
        text = text.replace('<?xml version="1.0"?>', f'<?xml version="1.0" encoding="{codec}"?>')
    path = sidecar_of(photo, text.encode(codec))
    with pytest.raises(xmp.Malformed) as raised:
        xmp.read(str(path))
    assert "s3cr3t" not in str(raised.value)


@pytest.mark.timeout(10)
def test_the_parser_refuses_entities_too(
    photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second line of defence, for encodings the byte check does not know."""
    monkeypatch.setattr(xmp, "_HOSTILE", ())
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-marker")
    for text in (xmp_samples.BILLION_LAUGHS, xmp_samples.external_entity(secret.as_uri())):
        path = sidecar_of(photo, text)
        with pytest.raises(xmp.Malformed) as raised:
            xmp.read(str(path))
        assert "s3cr3t" not in str(raised.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xd8\xff\xe0 a JPEG, not XML", "not well-formed XML"),
        (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF", "not well-formed XML"),
        (b"<html><body>hello</body></html>", "not XMP: its root element is 'html'"),
        (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", "not XMP: it has no rdf:RDF element"),
    ],
)
def test_what_is_not_xmp_is_malformed(photo: Path, content: bytes, reason: str) -> None:
    path = sidecar_of(photo, content)
    with pytest.raises(xmp.Malformed) as raised:
        xmp.read(str(path))
    assert str(raised.value).startswith(f"{path}: {reason}")


def test_a_sidecar_over_the_size_limit_is_malformed(
    photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xmp, "MAX_BYTES", 1000)
    path = sidecar_of(photo, xmp_samples.LIGHTROOM)
    with pytest.raises(xmp.Malformed, match="more than the 1000 a sidecar may have"):
        xmp.read(str(path))


def test_problems_pickle_with_their_path_and_reason() -> None:
    import pickle

    problem = pickle.loads(pickle.dumps(xmp.Changed("/p/a.xmp", "it changed")))
    assert isinstance(problem, xmp.Changed)
    assert (problem.path, str(problem)) == ("/p/a.xmp", "/p/a.xmp: it changed")


# -- reading and writing files ---------------------------------------------------------------


def test_read_follows_a_symlink_but_write_refuses_it(photo: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.xmp"
    target.write_text(xmp_samples.LIGHTROOM)
    path = sidecar_of(photo)
    path.symlink_to(target)
    snapshot = xmp.read(str(path))
    assert snapshot.flat == {"Paris", "dog"}
    data, _ = xmp.merge(snapshot, [BEACH], Owned(), MODEL)
    assert data is not None
    with pytest.raises(xmp.NotReplaceable, match="symbolic link"):
        xmp.write(snapshot, data, like=str(photo))
    assert path.is_symlink() and target.read_text() == xmp_samples.LIGHTROOM
    assert leftovers(tmp_path) == []


def test_a_hard_linked_sidecar_is_not_replaced(photo: Path, tmp_path: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    os.link(path, tmp_path / "copy.xmp")
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [BEACH], Owned(), MODEL)
    with pytest.raises(xmp.NotReplaceable, match="2 hard links"):
        xmp.write(snapshot, data or b"", like=str(photo))
    with pytest.raises(xmp.NotReplaceable):
        xmp.delete(snapshot)
    assert path.read_text() == xmp_samples.DARKTABLE
    assert (tmp_path / "copy.xmp").read_text() == xmp_samples.DARKTABLE


def test_something_else_in_a_sidecars_place_is_not_replaceable(photo: Path) -> None:
    path = sidecar_of(photo)
    os.mkfifo(path)  # read must not hang on it
    with pytest.raises(xmp.NotReplaceable, match="not a regular file"):
        xmp.read(str(path))


def test_a_sidecar_changed_since_read_is_not_overwritten(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.LIGHTROOM)
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [BEACH], Owned(), MODEL)
    assert data is not None
    saved = xmp_samples.LIGHTROOM.replace('xmp:Rating="4"', 'xmp:Rating="5"')
    path.write_text(saved)  # a photo manager saving meanwhile (same size)
    os.utime(path, ns=(0, snapshot.mtime_ns + 1))  # type: ignore[operator]
    with pytest.raises(xmp.Changed, match="changed since cliptagd read it"):
        xmp.write(snapshot, data, like=str(photo))
    with pytest.raises(xmp.Changed):
        xmp.delete(snapshot)
    assert path.read_text() == saved
    path.unlink()
    with pytest.raises(xmp.Changed, match="deleted since"):
        xmp.write(snapshot, data, like=str(photo))
    assert leftovers(path.parent) == []


def test_a_sidecar_that_appeared_since_read_is_not_overwritten(photo: Path) -> None:
    path = sidecar_of(photo)
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [DOG], Owned(), MODEL)
    path.write_text(xmp_samples.DIGIKAM)
    with pytest.raises(xmp.Changed, match="appeared"):
        xmp.write(snapshot, data or b"", like=str(photo))
    assert path.read_text() == xmp_samples.DIGIKAM


def test_write_returns_the_stat_the_caller_keeps(photo: Path) -> None:
    path = sidecar_of(photo)
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [DOG], Owned(), MODEL)
    assert data is not None
    size, mtime_ns = xmp.write(snapshot, data, like=str(photo))
    now = path.stat()
    assert (size, mtime_ns) == (now.st_size, now.st_mtime_ns) and size == len(data)
    assert leftovers(path.parent) == []


@pytest.mark.parametrize(
    ("photo_mode", "sidecar_mode"), [(0o640, 0o640), (0o755, 0o644), (0o444, 0o644)]
)
def test_a_new_sidecar_takes_the_photos_mode_without_execute_bits_but_writable(
    photo: Path, photo_mode: int, sidecar_mode: int
) -> None:
    photo.chmod(photo_mode)
    path = sidecar_of(photo)
    merged(path, [DOG], photo=photo)
    assert stat.S_IMODE(path.stat().st_mode) == sidecar_mode


def test_an_existing_sidecar_keeps_its_mode(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    path.chmod(0o604)
    merged(path, [DOG], photo=photo)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file another group needs root")
def test_a_sidecar_takes_the_photos_group_or_keeps_its_own(photo: Path) -> None:
    os.chown(photo, -1, 65534)
    path = sidecar_of(photo)
    merged(path, [DOG], photo=photo)
    assert path.stat().st_gid == 65534
    os.chown(path, -1, 0)
    merged(path, [BEACH], photo=photo)
    assert path.stat().st_gid == 0


def test_a_read_only_folder_is_unwritable_and_leaves_nothing(photo: Path) -> None:
    folder = photo.parent
    existing = sidecar_of(photo, xmp_samples.DARKTABLE)
    other = folder / "IMG_2.jpg.xmp"
    folder.chmod(0o555)
    try:
        with file_modes_enforced():
            for path in (existing, other):
                snapshot = xmp.read(str(path))
                data, _ = xmp.merge(snapshot, [DOG], Owned(), MODEL)
                with pytest.raises(xmp.Unwritable, match="cannot write it: Permission denied"):
                    xmp.write(snapshot, data or b"", like=str(photo))
            with pytest.raises(xmp.Unwritable, match="cannot delete it: Permission denied"):
                xmp.delete(xmp.read(str(existing)))
    finally:
        folder.chmod(0o755)
    assert existing.read_text() == xmp_samples.DARKTABLE and not other.exists()
    assert leftovers(folder) == []


def test_a_read_only_sidecar_is_not_replaced_even_by_root(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    path.chmod(0o444)
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [DOG], Owned(), MODEL)
    with pytest.raises(xmp.Unwritable, match=r"read-only \(Permission denied\)"):
        xmp.write(snapshot, data or b"", like=str(photo))
    assert path.read_text() == xmp_samples.DARKTABLE


def test_an_unreadable_sidecar_is_unwritable(photo: Path) -> None:
    path = sidecar_of(photo, xmp_samples.DARKTABLE)
    path.chmod(0o000)
    with (
        file_modes_enforced(),
        pytest.raises(xmp.Unwritable, match="cannot read it: Permission denied"),
    ):
        xmp.read(str(path))


def test_a_full_disk_is_unwritable_and_leaves_no_temporary_file(
    photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sidecar_of(photo, xmp_samples.LIGHTROOM)
    snapshot = xmp.read(str(path))
    data, _ = xmp.merge(snapshot, [DOG], Owned(), MODEL)

    def full(fd: int) -> None:  # where a full disk shows with delayed allocation
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(xmp.Unwritable, match="No space left on device"):
        xmp.write(snapshot, data or b"", like=str(photo))
    monkeypatch.undo()
    assert path.read_text() == xmp_samples.LIGHTROOM
    assert leftovers(path.parent) == []


def test_delete_of_a_sidecar_that_was_never_there_does_nothing(photo: Path) -> None:
    xmp.delete(xmp.read(str(sidecar_of(photo))))


# -- real readers ----------------------------------------------------------------------------


@needs_exiftool
def test_exiftool_reads_a_new_sidecar(photo: Path) -> None:
    path = sidecar_of(photo)
    merged(path, [DOG, BEACH], photo=photo)
    found = exiftool(path)[path.name]
    assert found["XMP-dc:Subject"] == ["dog", "beach"]
    assert found["XMP-lr:HierarchicalSubject"] == [DOG.hierarchical, BEACH.hierarchical]
    assert found["XMP-digiKam:TagsList"] == [DOG.tags_list, BEACH.tags_list]
    assert found["XMP-cliptagd:Model"] == MODEL
    assert found["XMP-cliptagd:Tags"] == [
        {"Set": "animals", "Label": "dog", "Score": 0.9123},
        {"Set": "scene", "Label": "beach", "Score": 0.5},
    ]
    assert "ExifTool:Warning" not in found


@pytest.fixture
def real_sidecars(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """darktable's, digiKam's and Lightroom's sidecars, and one exiftool made, each beside a
    photo of its own."""
    assert EXIFTOOL is not None
    paths = {}
    for tool, text in xmp_samples.SIDECARS.items():
        paths[tool] = sidecar_of(tmp_path / f"{tool}.jpg", text)
    made = tmp_path / "exiftool.jpg.xmp"
    subprocess.run(
        [EXIFTOOL, "-q", "-o", str(made), "-XMP-dc:Subject=sea", "-XMP-dc:Subject=dog",
         "-XMP-lr:HierarchicalSubject=places|sea", "-XMP-xmp:Rating=1",
         "-XMP-exif:GPSLatitude=48.85", "-XMP-exif:GPSLongitude=2.29"],
        check=True, timeout=60,
    )  # fmt: skip
    paths["exiftool"] = made
    for path in paths.values():
        Path(str(path).removesuffix(".xmp")).write_bytes(b"photo")
    yield paths


@pytest.mark.slow
@needs_exiftool
@needs_exiv2
def test_real_sidecars_keep_every_other_tag_through_merge_and_strip(
    real_sidecars: dict[str, Path],
) -> None:
    paths = list(real_sidecars.values())
    before = exiftool(*paths)
    wanted = [DOG, BEACH]
    owned = {}
    for path in paths:
        owned[path.name] = merged(path, wanted, photo=Path(str(path).removesuffix(".xmp")))
    after = exiftool(*paths)
    for path in paths:
        name, was, now = path.name, before[path.name], after[path.name]
        assert others(now) == others(was), name
        for tag, new in zip(KEYWORD_TAGS, ("flat", "hierarchical", "tags_list"), strict=True):
            had = was.get(tag, [])
            assert now[tag] == had + [
                getattr(k, new) for k in wanted if getattr(k, new) not in had
            ], name
        assert now["XMP-cliptagd:Model"] == MODEL, name
        assert [t["Label"] for t in now["XMP-cliptagd:Tags"]] == ["dog", "beach"], name
        read_by_exiv2 = exiv2(path)
        assert {"dog", "beach"} <= set(read_by_exiv2["Xmp.dc.subject"]), name
        assert DOG.hierarchical in read_by_exiv2["Xmp.lr.hierarchicalSubject"], name
        assert BEACH.tags_list in read_by_exiv2["Xmp.digiKam.TagsList"], name
        assert read_by_exiv2["Xmp.cliptagd.Tags[1]/cliptagd:Label"] == ["dog"], name
    # Lightroom's user already had "dog": it is not cliptagd's, and survives the strip.
    assert "dog" not in owned["lightroom.jpg.xmp"].flat
    assert "dog" in owned["darktable.jpg.xmp"].flat
    for path in paths:
        stripped(path, owned[path.name])
    assert exiftool(*paths) == before
    for path in paths:
        read_by_exiv2 = exiv2(path)
        assert not [key for key in read_by_exiv2 if key.startswith("Xmp.cliptagd")], path.name
        assert "beach" not in read_by_exiv2.get("Xmp.dc.subject", []), path.name
    assert canonical(real_sidecars["lightroom"].read_bytes()) == canonical(xmp_samples.LIGHTROOM)


@pytest.mark.slow
@needs_exiftool
def test_a_keyword_removed_in_exiftool_is_reported_missing(real_sidecars: dict[str, Path]) -> None:
    path = real_sidecars["digikam"]
    photo = Path(str(path).removesuffix(".xmp"))
    owned = merged(path, [DOG, BEACH], photo=photo)
    assert EXIFTOOL is not None
    # exiftool rewrites the whole file in its own layout (cliptagd's block first, its
    # structure's fields sorted): the same keywords still need no change.
    subprocess.run(
        [EXIFTOOL, "-q", "-overwrite_original", "-XMP-xmp:Rating=5", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    assert xmp.merge(xmp.read(str(path)), [DOG, BEACH], owned, MODEL) == (None, owned)
    subprocess.run(
        [EXIFTOOL, "-q", "-overwrite_original", "-XMP-dc:Subject-=dog",
         f"-XMP-lr:HierarchicalSubject-={DOG.hierarchical}", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    snapshot = xmp.read(str(path))
    assert xmp.missing(snapshot, owned) == Owned(
        flat=frozenset({"dog"}), hierarchical=frozenset({DOG.hierarchical})
    )
    assert snapshot.has_namespace  # exiftool kept cliptagd's block
    # The caller no longer wants dog: its last entry (TagsList) goes, and the file settles.
    owned = merged(path, [BEACH], owned, photo=photo)
    assert owned == Owned(
        frozenset({"beach"}), frozenset({BEACH.hierarchical}), frozenset({BEACH.tags_list})
    )
    snapshot = xmp.read(str(path))
    assert DOG.tags_list not in snapshot.tags_list
    assert xmp.merge(snapshot, [BEACH], owned, MODEL) == (None, owned)
    found = exiftool(path)[path.name]
    assert found["XMP-dc:Subject"] == ["Alice", "beach"]
    assert [t["Label"] for t in found["XMP-cliptagd:Tags"]] == ["beach"]
