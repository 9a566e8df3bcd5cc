"""A directory as a tar archive made of per-file chunks, with a cache that skips files that did not change.

A member's working directory goes into its image as ``workdir.tar`` (``hostside/workdir.py``).
Writing that tar, then reading, cutting and hashing all of it again at every snapshot costs as much
as the first upload however little changed. Here the archive is never written: ``TreeTar`` walks the
directory as ``tarfile.add(root, arcname=".")`` does (same order, same ``gettarinfo`` headers: modes,
owners, mtimes, symlinks, hard links, empty directories) and yields the archive as *pieces*: the tar
headers (with the previous member's padding) as small chunks, and each regular file's content cut by
content on its own (FastCDC, ``chunking.Packer``). The pieces' concatenation is a valid tar, so a
restore fetches and extracts it exactly as before, and a file store gets the same bytes streamed.

``StatCache`` (the helper keeps one per server, member and file, in memory) maps a file's path to
its stat key and the chunk list it had. A file whose key did not change is not read: its chunks are
named from the cache (the upload still asks the server about them, which leases them until the
manifest commits, and a chunk the server no longer has makes the upload start again without the
cache). The key is what git's index, restic and borg trust: path, size, mtime_ns, mode, owner, and,
unless the directory is a fresh clone of the member's (``clone=True``: the capture's reflink or
btrfs copy, whose inode numbers and ctimes are new each time while the mtimes are the member's),
inode, device and ctime_ns. A file modified less than ``RACY_NS`` before the scan began is never
cached (git's "racily clean" rule: a write in the same timestamp tick as the scan leaves its mtime
as it was), so a cached key cannot hide a write that came after it was recorded.
"""

import io
import json
import os
import tarfile
import threading
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from . import chunking

POINTER = ".tree"  # an image file "<name>.tree" (JSON {"root", "clone"}) stands for the tar <name> of root
RACY_NS = 2_000_000_000  # files modified this recently before a scan are read again next time
GLUE = 64 << 10  # headers and paddings gathered into one piece up to about this size


class TreeChanged(RuntimeError):
    """A file changed size while it was read (the directory is not a stable copy)."""


class Cached(NamedTuple):
    key: tuple
    chunks: List[Tuple[str, int]]


class StatCache:
    """path -> ``Cached`` from the last complete upload; replaced whole by the next one."""

    def __init__(self):
        self.entries: Dict[str, Cached] = {}
        self.lock = threading.Lock()

    def get(self, path: str) -> Optional[Cached]:
        return self.entries.get(path)

    def replace(self, entries: Dict[str, Cached]) -> None:
        with self.lock:
            self.entries = entries

    def clear(self) -> None:
        self.replace({})


_CACHES: Dict[tuple, StatCache] = {}
_CACHES_LOCK = threading.Lock()


def cache_for(*key) -> StatCache:
    """The process's cache for ``key`` (server URL, member, file name)."""
    with _CACHES_LOCK:
        return _CACHES.setdefault(key, StatCache())


def stat_key(st: os.stat_result, clone: bool) -> tuple:
    base = (st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid)
    return base if clone else base + (st.st_ino, st.st_dev, st.st_ctime_ns)


class _Null(io.RawIOBase):
    def writable(self):
        return True

    def write(self, data):
        return len(data)

    def tell(self):
        return 0


class TreeTar:
    """The tar of ``root`` as pieces (``chunking.Piece``; ``data`` None for a chunk named from ``cache``;
    without a ``packer``, the bytes only: ids empty, files read in 1 MiB pieces).

    ``stats`` after the walk: files, files_read, bytes_read, bytes (the archive's size)."""

    def __init__(self, root: str, packer: Optional[chunking.Packer], cache: Optional[StatCache] = None,
                 clone: bool = False, trust: bool = True, clock=time.time_ns):
        self.root, self.packer, self.cache, self.clone, self.clock = os.path.abspath(root), packer, cache, clone, clock
        self.trust = trust  # False: read every file (the cache is only written)
        self.new_entries: Dict[str, Cached] = {}
        self.stats = {"files": 0, "files_read": 0, "bytes_read": 0, "bytes": 0}

    def _names(self) -> Iterator[Tuple[str, str]]:
        """(path, arcname) in ``tarfile.add``'s order: a directory, then its entries sorted, depth first."""
        stack = [(self.root, ".")]
        while stack:
            path, arcname = stack.pop()
            yield path, arcname
            if os.path.isdir(path) and not os.path.islink(path):
                stack.extend(reversed([(os.path.join(path, n), arcname + "/" + n) for n in sorted(os.listdir(path))]))

    def pieces(self) -> Iterator[chunking.Piece]:
        began = self.clock()
        archive = tarfile.open(fileobj=_Null(), mode="w")  # its gettarinfo: hard links, owners, as add() makes them
        glue = bytearray()

        def flush():
            if glue:
                data = bytes(glue)
                glue.clear()
                self.stats["bytes"] += len(data)
                return chunking.Piece(chunking.chunk_id(data) if self.packer else "", data, len(data))
            return None

        for path, arcname in self._names():
            info = archive.gettarinfo(path, arcname)
            if info is None:  # a socket or the like: tarfile.add skips it too
                continue
            glue += info.tobuf(archive.format, archive.encoding, archive.errors)
            if not info.isreg() or info.size == 0:
                if len(glue) >= GLUE:
                    yield flush()
                continue
            piece = flush()
            if piece is not None:
                yield piece
            self.stats["files"] += 1
            yield from self._content(path, arcname, info)
            self.stats["bytes"] += info.size
            if info.size % tarfile.BLOCKSIZE:
                glue += bytes(tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
        end = 2 * tarfile.BLOCKSIZE + len(glue) + self.stats["bytes"]  # tarfile.close: two zero blocks, then a record
        glue += bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))
        piece = flush()
        if piece is not None:
            yield piece
        self.stats["began_ns"] = began

    def _content(self, path: str, arcname: str, info: tarfile.TarInfo) -> Iterator[chunking.Piece]:
        st = os.lstat(path)
        key = stat_key(st, self.clone)
        cached = self.cache.get(arcname) if self.cache is not None and self.trust else None
        if cached is not None and cached.key == key:
            self.new_entries[arcname] = cached
            for cid, size in cached.chunks:
                yield chunking.Piece(cid, None, size)
            return
        chunks, total = [], 0
        with open(path, "rb") as handle:
            reader = _Limited(handle, info.size)
            if self.packer is None:  # the bytes only (a store of whole files)
                pieces = (chunking.Piece("", d, len(d)) for d in iter(lambda: reader.read(1 << 20), b""))
            else:
                pieces = self.packer.pieces(reader)
            for piece in pieces:
                chunks.append((piece.id, len(piece.data)))
                total += len(piece.data)
                yield piece
        if total != info.size:
            raise TreeChanged("%s changed size while it was read (%d bytes, %d when listed)" % (path, total, info.size))
        self.stats["files_read"] += 1
        self.stats["bytes_read"] += total
        if st.st_mtime_ns < self.clock() - RACY_NS:  # not racily clean: a later write moves its mtime
            self.new_entries[arcname] = Cached(key, chunks)

    def commit_cache(self) -> None:
        """After the manifest committed: the cache becomes what this walk saw."""
        if self.cache is not None:
            self.cache.replace(self.new_entries)


class _Limited:
    """At most ``left`` bytes of ``handle`` (a file that grew after it was listed is cut at its listed size)."""

    def __init__(self, handle, left: int):
        self.handle, self.left = handle, left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size) if size else b""
        self.left -= len(data)
        return data


def tar_bytes(root: str) -> Iterator[bytes]:
    """The same archive as bytes, every file read (for a store that takes whole files)."""
    for piece in TreeTar(root, None).pieces():
        yield piece.data


def write_pointer(images: str, name: str, root: str, clone: bool = True) -> str:
    """Make ``images/<name>.tree`` stand for the tar of ``root`` (which must outlive the upload)."""
    path = os.path.join(images, name + POINTER)
    with open(path, "w") as handle:
        json.dump({"root": os.path.abspath(root), "clone": bool(clone), "tree": 1}, handle)
    return path


def read_pointer(path: str) -> Optional[dict]:
    """A tree pointer's {"root", "clone"}, or None if ``path`` is not one."""
    if not path.endswith(POINTER) or os.path.getsize(path) > 4096:
        return None
    try:
        with open(path) as handle:
            pointer = json.load(handle)
    except (OSError, ValueError):
        return None
    if not (isinstance(pointer, dict) and pointer.get("tree") == 1 and isinstance(pointer.get("root"), str)):
        return None
    if not os.path.isdir(pointer["root"]):  # never stored as the pointer itself: the image would lack its workdir
        raise TreeChanged("%s names %s, which is not a directory (the capture was discarded?)" % (path, pointer["root"]))
    return {"root": pointer["root"], "clone": bool(pointer.get("clone", True))}
