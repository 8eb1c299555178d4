"""XMP sidecars: cliptagd's tags in the files photo managers read, edited without harm.

digiKam, darktable, Lightroom, Immich and exiftool read keywords from a sidecar beside the
photo (IMG_1.jpg.xmp or IMG_1.xmp). cliptagd writes each kept tag the three ways those tools
look for it: the label as a flat keyword in dc:subject; a '|' path in lr:hierarchicalSubject
(Lightroom, darktable, Immich), one entry per tag, ancestors not listed apart; and the same
path with '/' in digiKam:TagsList. Beside them, one block in cliptagd's own namespace says
which model gave which tags:

    <rdf:Description rdf:about="" xmlns:cliptagd="http://ns.cliptagd.org/xmp/1.0/">
     <cliptagd:Model>ViT-B-32/openai</cliptagd:Model>
     <cliptagd:Tags>
      <rdf:Bag>
       <rdf:li rdf:parseType="Resource">
        <cliptagd:Set>animals</cliptagd:Set>
        <cliptagd:Label>dog</cliptagd:Label>
        <cliptagd:Score>0.9123</cliptagd:Score>
       ...

exiftool reports it as XMP-cliptagd:Model and XMP-cliptagd:Tags (a list of structures with
`-struct`; flattened, without it: XMP-cliptagd:TagsSet, TagsLabel and TagsScore); exiv2 as
Xmp.cliptagd.Model and Xmp.cliptagd.Tags[1]/cliptagd:Label and so on.

The sidecar is the person's before it is cliptagd's. Only cliptagd's own entries are edited:
the keywords it added (its caller keeps which, as `Owned`, with the size and mtime the
sidecar had when cliptagd last wrote it) and its namespace block. A keyword the person had
before is never owned, so never removed; new entries go at the end of the lists. The tree is
edited with lxml rather than through an XMP library: exiv2's bindings (pyexiv2) re-serialise
the whole packet through the XMP toolkit and are GPL, where cliptagd is MIT, and
python-xmp-toolkit needs the Exempi C library installed. Editing the RDF/XML tree ourselves
leaves every other element, attribute, namespace, comment and processing instruction as the
person's tools wrote it, and the bytes before and after the root element (XML declaration,
xpacket wrapper, padding) byte for byte in UTF-8, as sidecars are; lxml only normalises
quoting and spacing inside tags.

A sidecar is untrusted input: a file with a DOCTYPE (where entity bombs and external
entities live; XMP never has one) is refused before it is parsed, and the parser neither
expands entities, nor loads a DTD, nor reaches the network.

A sidecar is replaced whole (a temporary file in its folder, fsync, rename), never edited in
place, so a crash leaves the old or the new file, never half of one; and only if its size
and mtime are still those it had when read, so that a photo manager saving at the same
moment is not overwritten (the caller reads and merges again). It keeps its mode and group,
not its owner (only root could), and a read-only, symlinked or hard-linked sidecar is left
as it is. The module knows nothing of
the database or the config: it is given paths, keywords and what cliptagd owns.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from lxml import etree  # type: ignore[import-untyped]

from .paths import display

NAMESPACE = "http://ns.cliptagd.org/xmp/1.0/"  # fixed forever: it stays in people's files
PREFIX = "cliptagd"

# Real sidecars are kilobytes (a long darktable history makes a few hundred). A file's lxml
# tree takes several times its size in memory, and one odd file must not take the daemon
# down: 64 MiB is far above any real sidecar and far below that risk.
MAX_BYTES = 64 * 1024 * 1024

Naming: TypeAlias = Literal["append", "replace"]

# lxml ships no type information: its elements are Any to mypy.
Element: TypeAlias = Any

_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_XML = "http://www.w3.org/XML/1998/namespace"
_META = "adobe:ns:meta/"


def _tag(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


_RDF_RDF = _tag(_RDF, "RDF")
_DESCRIPTION = _tag(_RDF, "Description")
_LI = _tag(_RDF, "li")
_BAG = _tag(_RDF, "Bag")
_ABOUT = _tag(_RDF, "about")
_PARSE_TYPE = _tag(_RDF, "parseType")
_LISTS = {_BAG, _tag(_RDF, "Seq"), _tag(_RDF, "Alt")}
# Roots an XMP file may have: the packet's (x:xapmeta in files from before 2002), or bare RDF.
_ROOTS = {_tag(_META, "xmpmeta"), _tag(_META, "xapmeta"), _RDF_RDF}
# Attributes of an rdf:Description that name it rather than hold a property.
_NODE_ATTRIBUTES = {_ABOUT, _tag(_RDF, "ID"), _tag(_RDF, "nodeID"), _tag(_XML, "lang")}
# Attributes that make a property element something other than a plain value or a list.
_NOT_A_LIST = (_PARSE_TYPE, _tag(_RDF, "resource"), _tag(_RDF, "nodeID"))

# A DOCTYPE is where entity declarations live (billion laughs; external entities that read
# local files). XMP never has one, so a file with one is refused before the parser sees it.
# These byte forms cover UTF-8 and both UTF-16s; a check after parsing catches the rest.
_HOSTILE = tuple(
    marker.encode(codec)
    for marker in ("<!DOCTYPE", "<!ENTITY")
    for codec in ("utf-8", "utf-16-le", "utf-16-be")
)
_SPACE = b" \t\r\n"

# A new sidecar, before merge fills it: the standard packet, pretty-printed like exiftool's.
_NEW_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="cliptagd">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
).encode()


# -- problems ------------------------------------------------------------------------------


class SidecarProblem(Exception):
    """A sidecar cliptagd will not touch; str(e) is a plain-words reason including the path."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{display(path)}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (it may cross a process boundary) despite the two-argument constructor.
        return type(self), (self.path, self.reason)


class Malformed(SidecarProblem):
    """Not well-formed XML, not XMP, a DOCTYPE (hostile XML), or too big."""


class NotReplaceable(SidecarProblem):
    """A symbolic link, a file with other hard links, or not a regular file."""


class Unwritable(SidecarProblem):
    """The system refused to read or write it: permissions, a read-only or full disk."""


class Changed(SidecarProblem):
    """It changed on disk since it was read: read and merge again."""


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keyword:
    """One kept tag as written into a sidecar."""

    label_set: str
    label: str
    score: float
    hierarchical: str  # e.g. "cliptagd|animals|dog" ('|' separated, Lightroom's form)

    @property
    def flat(self) -> str:
        """The dc:subject keyword: the label."""
        return self.label

    @property
    def tags_list(self) -> str:
        """The digiKam:TagsList entry: the hierarchical path with digiKam's '/'."""
        return self.hierarchical.replace("|", "/")


@dataclass(frozen=True, slots=True)
class Owned:
    """The keywords cliptagd added to one sidecar (and so may remove): a flat keyword the user
    had before cliptagd came is never in here, so it is never removed."""

    flat: frozenset[str] = frozenset()  # dc:subject values
    hierarchical: frozenset[str] = frozenset()  # lr:hierarchicalSubject values
    tags_list: frozenset[str] = frozenset()  # digiKam:TagsList values

    def to_json(self) -> str:
        """For the caller's database column: sorted lists, so equal sets give equal text."""
        return json.dumps(
            {
                "flat": sorted(self.flat),
                "hierarchical": sorted(self.hierarchical),
                "tags_list": sorted(self.tags_list),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str | None) -> Owned:
        """What `to_json` wrote; nothing owned for an empty column."""
        if not text:
            return cls()
        found = json.loads(text)
        return cls(
            flat=frozenset(found.get("flat", ())),
            hierarchical=frozenset(found.get("hierarchical", ())),
            tags_list=frozenset(found.get("tags_list", ())),
        )

    def __bool__(self) -> bool:
        return bool(self.flat or self.hierarchical or self.tags_list)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A sidecar as read: its bytes (None when there is no file), the stat that tells whether
    it changed since, and the keywords it holds."""

    path: str
    data: bytes | None
    size: int | None
    mtime_ns: int | None
    flat: frozenset[str]  # dc:subject
    hierarchical: frozenset[str]  # lr:hierarchicalSubject
    tags_list: frozenset[str]  # digiKam:TagsList
    has_namespace: bool  # cliptagd's namespace is declared or used anywhere in it


@dataclass(frozen=True, slots=True)
class _Property:
    """One of the three keyword lists: its field in Owned and Snapshot, and its XMP name."""

    field: str
    namespace: str
    name: str
    prefix: str  # the usual prefix, used when the namespace is declared anew
    kind: str  # the list type for a new property

    @property
    def tag(self) -> str:
        return _tag(self.namespace, self.name)

    @property
    def qname(self) -> str:
        return f"{self.prefix}:{self.name}"


_PROPERTIES = (
    _Property("flat", "http://purl.org/dc/elements/1.1/", "subject", "dc", "Bag"),
    _Property(
        "hierarchical", "http://ns.adobe.com/lightroom/1.0/", "hierarchicalSubject", "lr", "Bag"
    ),
    _Property("tags_list", "http://www.digikam.org/ns/1.0/", "TagsList", "digiKam", "Seq"),
)


# -- paths ---------------------------------------------------------------------------------


def candidates(photo: str, naming: Naming) -> tuple[str, str]:
    """(the configured naming's path, the other naming's path): append = photo + ".xmp"
    (IMG_1.jpg.xmp), replace = stem + ".xmp" (IMG_1.xmp)."""
    append = photo + ".xmp"
    replace = os.path.splitext(photo)[0] + ".xmp"
    return (append, replace) if naming == "append" else (replace, append)


def sidecar_path(photo: str, naming: Naming) -> str:
    """The sidecar to use for a photo: the configured naming's, unless only the other naming's
    exists (then that one, so a photo never gets a second sidecar)."""
    configured, other = candidates(photo, naming)
    if not os.path.lexists(configured) and os.path.lexists(other):
        return other
    return configured


# -- reading and editing -------------------------------------------------------------------


def read(path: str) -> Snapshot:
    """The sidecar at `path` (data None when there is none); reading through a symbolic link
    is allowed, only replacing one is refused."""
    try:
        # O_NONBLOCK: a FIFO in a sidecar's place must not hang the daemon at open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Snapshot(path, None, None, None, frozenset(), frozenset(), frozenset(), False)
    except OSError as error:
        raise Unwritable(path, f"cannot read it: {_why(error)}") from None
    try:
        # The stat from before reading: a change made while or after the bytes are read then
        # shows as a different size or mtime when the file is replaced.
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise NotReplaceable(path, "not a regular file")
        if before.st_size > MAX_BYTES:
            raise _too_big(path, before.st_size)
        data = _read_all(fd, MAX_BYTES + 1)
    except OSError as error:
        raise Unwritable(path, f"cannot read it: {_why(error)}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise _too_big(path, len(data))
    values: dict[str, frozenset[str]] = {prop.field: frozenset() for prop in _PROPERTIES}
    has_namespace = False
    if not _blank(data):
        document = _Document(path, data)
        values = {prop.field: frozenset(document.values(prop)) for prop in _PROPERTIES}
        has_namespace = document.has_namespace()
    return Snapshot(
        path=path,
        data=data,
        size=before.st_size,
        mtime_ns=before.st_mtime_ns,
        has_namespace=has_namespace,
        **values,
    )


def missing(snapshot: Snapshot, owned: Owned) -> Owned:
    """What cliptagd owned that is no longer in the sidecar (removed by a person in a photo
    manager; everything, when the sidecar itself is gone)."""
    return Owned(
        flat=owned.flat - snapshot.flat,
        hierarchical=owned.hierarchical - snapshot.hierarchical,
        tags_list=owned.tags_list - snapshot.tags_list,
    )


def merge(
    snapshot: Snapshot, keywords: Sequence[Keyword], owned: Owned, model_id: str
) -> tuple[bytes | None, Owned]:
    """The sidecar's new bytes with exactly `keywords` as cliptagd's entries, and what cliptagd
    owns afterwards; None when the bytes would not change (the caller then writes nothing)."""
    wanted = _unique_keywords(keywords)
    if snapshot.data is None or _blank(snapshot.data):
        if not wanted:
            return None, Owned()  # no sidecar made for nothing
        document = _Document(snapshot.path, _NEW_PACKET)
    else:
        document = _Document(snapshot.path, snapshot.data)
    # The block stays while cliptagd has any history here, so that a person's removal of
    # every cliptagd keyword is still told apart from a sidecar cliptagd never wrote.
    keep_block = bool(wanted) or bool(owned) or document.has_namespace()
    now_owned: dict[str, frozenset[str]] = {}
    for prop in _PROPERTIES:
        present = document.values(prop)
        mine = getattr(owned, prop.field) & set(present)
        values = list(dict.fromkeys(getattr(keyword, prop.field) for keyword in wanted))
        added = [value for value in values if value not in present]
        document.edit(prop, remove=mine - set(values), add=added)
        now_owned[prop.field] = frozenset(mine.intersection(values) | set(added))
    if keep_block:
        document.set_block(model_id, wanted)
    data = document.serialise() if document.changed else None
    return (None if data == snapshot.data else data), Owned(**now_owned)


def strip(snapshot: Snapshot, owned: Owned, *, created: bool = True) -> bytes | None:
    """The sidecar without any of cliptagd's entries (owned keywords and its namespace block);
    b"" when nothing but an empty XMP packet would be left and cliptagd `created` the file
    (the caller deletes it; a file that was the person's keeps its empty packet); None if
    there is nothing to change."""
    if snapshot.data is None or _blank(snapshot.data):
        return None
    document = _Document(snapshot.path, snapshot.data)
    for prop in _PROPERTIES:
        mine = getattr(owned, prop.field) & set(document.values(prop))
        document.edit(prop, remove=mine, add=[])
    document.drop_block()
    if not document.changed:
        return None
    return b"" if created and document.is_empty() else document.serialise()


# -- writing -------------------------------------------------------------------------------


def write(snapshot: Snapshot, data: bytes, *, like: str) -> tuple[int, int]:
    """Write `data` over the sidecar `snapshot` was read from (a new sidecar takes the mode
    and group of the photo `like`); return the new (size, mtime_ns)."""
    path = snapshot.path
    folder = os.path.dirname(path) or "."
    try:
        current = _unchanged(snapshot)
    except OSError as error:
        raise Unwritable(path, f"cannot write it: {_why(error)}") from None
    if current is not None:
        mode, group = stat.S_IMODE(current.st_mode), current.st_gid
    else:
        try:
            photo = os.stat(like)
        except OSError as error:
            raise Unwritable(path, f"cannot read the photo's mode: {_why(error)}") from None
        # A sidecar is data: the photo's read and write bits, never its execute bits; and
        # writable by its owner even beside a read-only photo, or cliptagd could never
        # update the sidecar it made (a read-only sidecar is left alone: see _unchanged).
        mode, group = stat.S_IMODE(photo.st_mode) & 0o666 | 0o200, photo.st_gid
    try:
        name = _short(os.path.basename(path))
        fd, temp = tempfile.mkstemp(prefix=f".{name}.cliptagd-", suffix=".tmp", dir=folder)
    except OSError as error:
        raise Unwritable(path, f"cannot write it: {_why(error)}") from None
    replaced = False
    try:
        try:
            _write_all(fd, data)
            _best_effort(os.fchown, fd, -1, group)  # before chmod: chown may clear setgid
            _best_effort(os.fchmod, fd, mode)
            os.fsync(fd)
            # rename keeps the mtime, so this is the stat the sidecar will have.
            written = os.fstat(fd)
        finally:
            os.close(fd)
        # Again, as close to the rename as it can be. POSIX has no rename-if-unchanged, so a
        # save that lands in the microseconds between this check and the rename is lost;
        # the window is the smallest this can make it.
        _unchanged(snapshot)
        os.replace(temp, path)
        replaced = True
    except OSError as error:
        raise Unwritable(path, f"cannot write it: {_why(error)}") from None
    finally:
        if not replaced:
            _discard(temp)
    _sync_folder(folder)
    return written.st_size, written.st_mtime_ns


def delete(snapshot: Snapshot) -> None:
    """Remove the sidecar `snapshot` was read from, only if it is unchanged since."""
    path = snapshot.path
    try:
        if _unchanged(snapshot) is None:
            return  # none, as when read
        os.unlink(path)
    except OSError as error:
        raise Unwritable(path, f"cannot delete it: {_why(error)}") from None
    _sync_folder(os.path.dirname(path) or ".")


def _unchanged(snapshot: Snapshot) -> os.stat_result | None:
    """The sidecar's stat now (None if there is none), after checking that it may be replaced
    and that it is as `snapshot` saw it."""
    path = snapshot.path
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        if snapshot.data is not None:
            raise Changed(path, "it was deleted since cliptagd read it") from None
        return None
    if stat.S_ISLNK(now.st_mode):
        # Replacing would put a file where the link was and leave its target as it was.
        raise NotReplaceable(path, "a symbolic link; cliptagd replaces only plain files")
    if not stat.S_ISREG(now.st_mode):
        raise NotReplaceable(path, "not a regular file")
    if now.st_nlink > 1:
        # Replacing would give this name new bytes and leave the other names the old ones.
        raise NotReplaceable(path, f"it has {now.st_nlink} hard links; replacing would split them")
    if snapshot.data is None:
        raise Changed(path, "it appeared since cliptagd looked for it")
    if (now.st_size, now.st_mtime_ns) != (snapshot.size, snapshot.mtime_ns):
        raise Changed(path, "it changed since cliptagd read it")
    if not now.st_mode & 0o222 or not os.access(path, os.W_OK):
        # A read-only sidecar is kept as its owner made it, even where the folder would let
        # cliptagd replace it (and even as root).
        raise Unwritable(path, f"the file is read-only ({os.strerror(errno.EACCES)})")
    return now


def _best_effort(change: Any, *args: int) -> None:
    """chown or chmod, where the file system and our rights allow: only the owner's groups
    may be given, and FAT-like file systems have no modes; the sidecar still works."""
    try:
        change(*args)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.EOPNOTSUPP):
            raise


def _sync_folder(folder: str) -> None:
    """Make a rename or unlink durable; some file systems cannot, and the change is made."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _discard(temp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(temp)


def _short(name: str) -> str:
    """A temporary file's name part, short enough that the whole stays under 255 bytes."""
    return os.fsdecode(os.fsencode(name)[:200])


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _why(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def _too_big(path: str, size: int) -> Malformed:
    return Malformed(path, f"{size} bytes, more than the {MAX_BYTES} a sidecar may have")


def _blank(data: bytes) -> bool:
    """An empty file (or only white space, BOM aside): a sidecar with nothing in it yet."""
    return not data.removeprefix(b"\xef\xbb\xbf").strip(_SPACE)


def _unique_keywords(keywords: Iterable[Keyword]) -> list[Keyword]:
    """One keyword per (label set, label), the first given."""
    unique: dict[tuple[str, str], Keyword] = {}
    for keyword in keywords:
        unique.setdefault((keyword.label_set, keyword.label), keyword)
    return list(unique.values())


# -- the XML tree --------------------------------------------------------------------------


def _namespace_of(name: str) -> str | None:
    return name[1:].split("}", 1)[0] if name.startswith("{") else None


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _is_element(node: Element) -> bool:
    return isinstance(node.tag, str)  # comments and processing instructions are not


def _parser() -> Any:
    # A new parser per document: lxml parsers may not be shared between threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_blank_text=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
        collect_ids=False,
    )


def _space_before(node: Element) -> str:
    """The line break and indentation before `node`, "" when it is not on a line of its own."""
    previous = node.getprevious()
    parent = node.getparent()
    text: str | None = (
        previous.tail if previous is not None else (parent.text if parent is not None else None)
    )
    if not text or text.strip() or "\n" not in text:
        return ""
    return "\n" + text.rsplit("\n", 1)[1]


def _remove(node: Element) -> None:
    """Take `node` out, leaving the indentation around it as it would be without it."""
    parent = node.getparent()
    previous = node.getprevious()
    if node.getnext() is None:
        # The last child's tail indents its parent's closing tag.
        if previous is not None:
            previous.tail = node.tail
        else:
            parent.text = node.tail
    parent.remove(node)  # lxml takes the node's tail with it


class _Document:
    """A parsed sidecar, edited in place; `changed` once any edit was made."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path = path
        self.data = data
        self.changed = False
        self._unit: str | None = None
        if any(marker in data for marker in _HOSTILE):
            raise self._hostile()
        try:
            self.root = etree.fromstring(data, _parser())
        except etree.XMLSyntaxError as error:
            raise Malformed(path, f"not well-formed XML ({error})") from None
        info = self.root.getroottree().docinfo
        if info.doctype or info.internalDTD is not None:
            raise self._hostile()
        self.encoding: str = info.encoding or "UTF-8"
        if self.root.tag not in _ROOTS:
            raise Malformed(path, f"not XMP: its root element is {self.root.tag!r}")
        rdf = self.root if self.root.tag == _RDF_RDF else self.root.find(_RDF_RDF)
        if rdf is None:
            raise Malformed(path, "not XMP: it has no rdf:RDF element")
        self.rdf = rdf
        self._around = self._around_root()

    def _hostile(self) -> Malformed:
        return Malformed(self.path, "it declares a DOCTYPE or entities, which XMP never does")

    # -- reading --

    def descriptions(self) -> list[Element]:
        return list(self.rdf.iterchildren(_DESCRIPTION))

    def values(self, prop: _Property) -> list[str]:
        """The property's entries in file order ([] when it is not there)."""
        found = self._find(prop)
        if found is None:
            return []
        description, element = found
        if element is None:
            return [str(description.get(prop.tag))]  # attribute form: one value
        container = self._container(element, prop)
        if container is None:
            text = element.text or ""
            return [text] if text.strip() else []  # a single value instead of a list
        return [li.text or "" for li in container.iterchildren(_LI)]

    def has_namespace(self) -> bool:
        for element in self.root.iter():
            if not _is_element(element):
                continue
            if NAMESPACE in element.nsmap.values() or _namespace_of(element.tag) == NAMESPACE:
                return True
            if any(_namespace_of(name) == NAMESPACE for name in element.attrib):
                return True
        return False

    def is_empty(self) -> bool:
        """Nothing but an empty packet: no property in any description, nothing else."""
        for element in self.root.iter():
            if element is self.root or element is self.rdf or not _is_element(element):
                continue
            if element.getparent() is not self.rdf or element.tag != _DESCRIPTION:
                return False
            if any(name not in _NODE_ATTRIBUTES for name in element.attrib):
                return False
        return True

    def _find(self, prop: _Property) -> tuple[Element, Element | None] | None:
        """(the description, the property element or None for attribute form)."""
        for description in self.descriptions():
            element = description.find(prop.tag)
            if element is not None:
                return description, element
            if prop.tag in description.attrib:
                return description, None
        return None

    def _container(self, element: Element, prop: _Property) -> Element | None:
        """The property's rdf:Bag/Seq/Alt; None for a single value."""
        children = [child for child in element if _is_element(child)]
        if any(element.get(name) is not None for name in _NOT_A_LIST) or (
            children and (len(children) > 1 or children[0].tag not in _LISTS)
        ):
            raise Malformed(self.path, f"its {prop.qname} is neither a list nor a single value")
        return children[0] if children else None

    # -- editing --

    def edit(self, prop: _Property, *, remove: Collection[str], add: Sequence[str]) -> None:
        """Take the `remove` entries out of the property's list (every copy), append `add`."""
        if not remove and not add:
            return
        container = self._list_for(prop)
        for li in list(container.iterchildren(_LI)):
            if (li.text or "") in remove:
                _remove(li)
        for value in add:
            self._add(container, _LI).text = value
        if len(container) == 0:
            # Emptied by cliptagd: an empty list says nothing, so it goes, and its
            # description too if that is left with nothing.
            property_element = container.getparent()
            description = property_element.getparent()
            _remove(property_element)
            self._prune(description)
            self._undeclare(prop.namespace)
        self.changed = True

    def _list_for(self, prop: _Property) -> Element:
        """The property's list, made (in the first description) or converted from a single
        value or attribute form when needed."""
        found = self._find(prop)
        if found is None:
            description = self._keyword_description()
            element = self._add_property(description, prop)
            return self._add(element, _tag(_RDF, prop.kind))
        description, element = found
        if element is None:
            # Attribute form holds one value; the list form holds it and the new ones.
            value = description.attrib.pop(prop.tag)
            element = self._add_property(description, prop)
            container = self._add(element, _tag(_RDF, prop.kind))
            self._add(container, _LI).text = value
            return container
        container = self._container(element, prop)
        if container is None:
            value = element.text or ""
            element.text = None
            container = self._add(element, _tag(_RDF, prop.kind))
            if value.strip():
                self._add(container, _LI).text = value
        return container

    def _keyword_description(self) -> Element:
        """The description new keyword properties go in: the first one that is not only
        cliptagd's block; a new one before all others when there is none."""
        descriptions = self.descriptions()
        for description in descriptions:
            if not self._only_ours(description):
                return description
        if not descriptions:
            description = self._add(self.rdf, _DESCRIPTION)
        else:
            # Before cliptagd's block, which stays last.
            first = descriptions[0]
            indent = _space_before(first)
            description = etree.SubElement(self.rdf, _DESCRIPTION)
            first.addprevious(description)
            description.tail = indent or None
        description.set(_ABOUT, "")
        return description

    def _add_property(self, description: Element, prop: _Property) -> Element:
        """A new property element at the end of `description`, its namespace declared on the
        description when not in scope there (as the tools that write XMP do)."""
        prefix = self._prefix_for(description, prop.prefix, prop.namespace)
        if prefix is None:
            return self._add(description, prop.tag)
        element = self._add(description, prop.tag, nsmap={prefix: prop.namespace})
        # Move the declaration up to the description, every other declaration kept as is.
        keep = {name for node in description.iter() if _is_element(node) for name in node.nsmap}
        etree.cleanup_namespaces(
            description,
            top_nsmap={prefix: prop.namespace},
            keep_ns_prefixes=sorted(name for name in keep if name),
        )
        return element

    @staticmethod
    def _prefix_for(element: Element, usual: str, namespace: str) -> str | None:
        """None when `namespace` is in scope at `element`, else a free prefix for it."""
        in_scope = element.nsmap
        if namespace in in_scope.values():
            return None
        prefix, n = usual, 1
        while prefix in in_scope:
            n += 1
            prefix = f"{usual}{n}"
        return prefix

    def _add(self, parent: Element, tag: str, nsmap: dict[str, str] | None = None) -> Element:
        """A new last child of `parent`, on its own line indented like its siblings (or one
        step in from `parent`) where the document is indented."""
        children = list(parent)
        if children:
            last = children[-1]
            indent = _space_before(last)
            closing = last.tail
        else:
            outer = _space_before(parent)
            indent = outer + self.unit if outer else ""
            closing = outer or None
            if indent and not (parent.text or "").strip():
                parent.text = indent
        child = etree.SubElement(parent, tag, nsmap=nsmap)
        if children and indent:
            last.tail = indent
        if indent:
            child.tail = closing
        return child

    @property
    def unit(self) -> str:
        """One step of indentation in this document (one space, exiftool's, if none shows)."""
        if self._unit is None:
            self._unit = " "
            for element in self.root.iter():
                outer = _space_before(element) if _is_element(element) else ""
                child = next((c for c in element if _is_element(c)), None) if outer else None
                inner = _space_before(child) if child is not None else ""
                if inner.startswith(outer) and len(inner) > len(outer):
                    self._unit = inner[len(outer) :]
                    break
        return self._unit

    def _prune(self, description: Element) -> None:
        """Remove a description cliptagd emptied."""
        if len(description) == 0 and all(name in _NODE_ATTRIBUTES for name in description.attrib):
            _remove(description)

    @staticmethod
    def _only_ours(description: Element) -> bool:
        children = [child for child in description if _is_element(child)]
        ours = [child for child in children if _namespace_of(child.tag) == NAMESPACE]
        return bool(ours) and len(ours) == len(children)

    # -- cliptagd's block --

    def block(self) -> tuple[str | None, list[tuple[str, str, str]]] | None:
        """cliptagd's block as (model, [(set, label, score)]); None when it is absent or not
        in the one shape `set_block` writes (split, or edited by hand)."""
        descriptions = self.descriptions()
        if any(_namespace_of(name) == NAMESPACE for d in descriptions for name in d.attrib):
            return None
        ours = [
            child
            for description in descriptions
            for child in description
            if _is_element(child) and _namespace_of(child.tag) == NAMESPACE
        ]
        if [child.tag for child in ours] != [_tag(NAMESPACE, "Model"), _tag(NAMESPACE, "Tags")]:
            return None
        model, tags = ours
        bags = [child for child in tags if _is_element(child)]
        if len(bags) != 1 or bags[0].tag != _BAG:
            return None
        entries = []
        for li in bags[0]:
            if not _is_element(li):
                continue
            if li.tag != _LI or li.get(_PARSE_TYPE) != "Resource":
                return None
            fields = {_local(c.tag): c.text or "" for c in li if _is_element(c)}
            if set(fields) != {"Set", "Label", "Score"}:
                return None
            entries.append((fields["Set"], fields["Label"], fields["Score"]))
        return model.text, entries

    def set_block(self, model_id: str, keywords: Sequence[Keyword]) -> None:
        """cliptagd's block, replaced whole by one for `keywords` unless it is that already."""
        entries = [(k.label_set, k.label, _score(k.score)) for k in keywords]
        if self.block() == (model_id, entries):
            return
        self.drop_block()
        prefix = self._prefix_for(self.rdf, PREFIX, NAMESPACE) or PREFIX
        description = self._add(self.rdf, _DESCRIPTION, nsmap={prefix: NAMESPACE})
        description.set(_ABOUT, "")
        self._add(description, _tag(NAMESPACE, "Model")).text = model_id
        bag = self._add(self._add(description, _tag(NAMESPACE, "Tags")), _BAG)
        for label_set, label, score in entries:
            li = self._add(bag, _LI)
            li.set(_PARSE_TYPE, "Resource")
            self._add(li, _tag(NAMESPACE, "Set")).text = label_set
            self._add(li, _tag(NAMESPACE, "Label")).text = label
            self._add(li, _tag(NAMESPACE, "Score")).text = score
        self.changed = True

    def drop_block(self) -> None:
        """Remove every property in cliptagd's namespace, and its namespace declarations."""
        for description in self.descriptions():
            ours = [name for name in description.attrib if _namespace_of(name) == NAMESPACE]
            for name in ours:
                del description.attrib[name]
            children = [c for c in description if _is_element(c)]
            for child in children:
                if _namespace_of(child.tag) == NAMESPACE:
                    _remove(child)
                    ours.append(child.tag)
            if ours:
                self._prune(description)
                self.changed = True
        if self._undeclare(NAMESPACE):
            self.changed = True

    def _undeclare(self, namespace: str) -> bool:
        """Remove the declarations of `namespace` if nothing uses it (those cliptagd made, or
        left where a tool moved cliptagd's block); every other declaration stays. True if
        any went."""
        elements = [element for element in self.root.iter() if _is_element(element)]
        if not any(namespace in element.nsmap.values() for element in elements):
            return False
        if any(
            _namespace_of(name) == namespace for element in elements
            for name in (element.tag, *element.attrib)
        ):  # fmt: skip
            return False
        keep = {
            prefix
            for element in elements
            for prefix, uri in element.nsmap.items()
            if prefix and uri != namespace
        }
        etree.cleanup_namespaces(self.root, keep_ns_prefixes=sorted(keep))
        return True

    # -- writing --

    def serialise(self) -> bytes:
        """The edited document, the bytes around the root element as they were read."""
        if self._around is not None:
            before, after = self._around
            body = etree.tostring(
                self.root, encoding=self.encoding, xml_declaration=False, with_tail=False
            )
            return before + bytes(body) + after
        text = self.data.decode(self.encoding, errors="replace")
        declared = text.lstrip("\ufeff \t\r\n").startswith("<?xml")
        tree = self.root.getroottree()
        return bytes(etree.tostring(tree, encoding=self.encoding, xml_declaration=declared))

    def _around_root(self) -> tuple[bytes, bytes] | None:
        """The bytes before the root element (XML declaration, xpacket begin, comments) and
        after it (xpacket end, padding); None where they cannot be told apart safely (an
        encoding that is not a superset of ASCII), and lxml writes them instead."""
        data = self.data
        try:
            if "<?->".encode(self.encoding) != b"<?->":
                return None
        except LookupError:
            return None
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        nodes = 0
        while True:
            start = len(data) - len(data[start:].lstrip(_SPACE))
            if data.startswith(b"<?", start):
                end, close = data.find(b"?>", start), 2
                nodes += not data.startswith(b"<?xml", start) or data[start + 5] not in _SPACE
            elif data.startswith(b"<!--", start):
                end, close = data.find(b"-->", start), 3
                nodes += 1
            else:
                break
            if end < 0:
                return None
            start = end + close
        if nodes != sum(1 for _ in self.root.itersiblings(preceding=True)):
            return None
        end = len(data)
        for _ in self.root.itersiblings():
            end = len(data[:end].rstrip(_SPACE))
            if data.endswith(b"?>", 0, end):
                end = data.rfind(b"<?", start, end)
            elif data.endswith(b"-->", 0, end):
                end = data.rfind(b"<!--", start, end)
            else:
                return None
            if end < 0:
                return None
        end = len(data[:end].rstrip(_SPACE))
        if not data.startswith(b"<", start) or not data.endswith(b">", 0, end) or end <= start:
            return None
        return data[:start], data[end:]


def _score(score: float) -> str:
    return f"{score:.4f}"
