"""The Store interface: what the snapshot server needs from whatever keeps the images.

The HTTP server (``server.py``) speaks only this interface, so a store with another layout, such as
a content-addressed chunk store (files cut into chunks, deduplicated, compressed, described by
manifests, garbage-collected and verified), replaces ``FileStore`` without changing the server,
its HTTP API or the helpers that talk to it.

A stored file is addressed by ``(snapshot, member, name)``, three names that match ``NAME_RE``;
``FileInfo`` is what the store knows of it: its name, size and sha256 of its *content* (whatever
the store does to the bytes underneath). The rules every store keeps:

- ``put`` is atomic: a file is visible to ``open`` and ``index`` only once all of it is stored
  durably (fsynced) and its checksum is right; a put that fails (the chunks raise, the checksum is
  wrong, the disk is full) leaves nothing visible and nothing behind. A second put of the same
  name replaces the first, atomically.
- ``open`` gives back the content with the checksum recorded by ``put``; the reader checks it (the
  client does), so a store need not verify on every read.
- errors are ``NotFound``, ``ChecksumMismatch`` and ``InvalidName``; ``OSError`` means the store
  itself failed (the server answers 507 for a put, 500 otherwise).
"""

import abc
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, List, Optional, Tuple

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CHUNK = 1 << 20


class StoreError(Exception):
    """Something a store refuses (the subclasses say what)."""


class NotFound(StoreError, LookupError):
    """No such snapshot, member or file."""


class ChecksumMismatch(StoreError):
    """The content received does not have the sha256 the sender announced; nothing was stored."""


class InvalidName(StoreError, ValueError):
    """A snapshot, member or file name the store cannot take (see ``NAME_RE``, or reserved)."""


@dataclass(frozen=True)
class FileInfo:
    name: str
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_names(*names: str) -> None:
    """Every name a safe single path component (no "/", "..", leading dot); else ``InvalidName``."""
    for name in names:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidName("bad name %r: letters, digits, _ . - (not first), at most 100" % (name,))


class Store(abc.ABC):
    """Where the snapshot server keeps members' image files (see the module docstring for the rules).

    A store is built from one string, the text after ``<scheme>:`` in ``--store <scheme>:<argument>``
    (``file:/srv/images``); ``root`` says where it keeps its data (shown by ``GET /health``)."""

    scheme = ""
    root = ""

    @abc.abstractmethod
    def put(self, snapshot: str, member: str, name: str, chunks: Iterable[bytes],
            expected_sha256: Optional[str] = None) -> FileInfo:
        """Store the file made of ``chunks`` (consumed once, as they come: they may be a network
        stream); if ``expected_sha256`` is given and differs, raise ``ChecksumMismatch``. Whatever
        ``chunks`` raises (a truncated body) propagates, with nothing stored."""

    @abc.abstractmethod
    def open(self, snapshot: str, member: str, name: str) -> Tuple[Iterator[bytes], FileInfo]:
        """The content of a stored file, as an iterator of chunks (close it if not exhausted), and
        what ``put`` recorded of it; ``NotFound`` if there is no such file."""

    @abc.abstractmethod
    def index(self, snapshot: str, member: str) -> Optional[List[FileInfo]]:
        """The complete files of a member's image, in the order they were first stored; None if the
        store has no image of that member."""

    @abc.abstractmethod
    def delete(self, snapshot: str, member: Optional[str] = None) -> bool:
        """Forget every file of a snapshot, or of one member's image in it (a chunk store frees chunks
        no other snapshot uses); False if there was no such snapshot (or member image)."""

    @abc.abstractmethod
    def snapshots(self) -> List[str]:
        """The snapshots that have files, sorted."""

    @abc.abstractmethod
    def totals(self) -> dict:
        """At least ``{"snapshots": n, "files": n, "bytes": n}``: the content's size; a store that
        deduplicates or compresses adds what it really holds (e.g. ``"stored_bytes"``)."""
