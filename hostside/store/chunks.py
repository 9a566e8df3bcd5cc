"""``ChunkStore`` (``--store chunks:DIR``): images cut into content-defined chunks, each stored once.

    <root>/.chunks/<id[:2]>/<id>                          a chunk, zstd-compressed, named by the
                                                          BLAKE3 hash of its content (chunking.py)
    <root>/.manifests/<snapshot>/<member>/index.json      {"snapshot", "member", "files": [{name,
                                                          bytes, sha256, chunks: [[id, size], ...]}]}
    <root>/.lock                                          flock: commits, GC and "missing" answers
    <root>/<snapshot>/<member>/...                        a FileStore's layout: read as it is

A chunk is stored once per server whatever snapshot, member or backend it came from. Writes go
chunk files first (temp + fsync + rename + fsync of the directory), the manifest last (rewritten
the same way, under the lock, only once every chunk it names is on disk): a crash at any point
leaves at most unreferenced chunks or temp files, never a file that seems complete and is not.

Garbage collection (``gc``, run by every delete) is mark and sweep under the lock: it keeps the
chunks the manifests name and the chunks *leased* to uploaders. ``missing`` (under the lock) leases
every chunk it reports present, and ``store_chunks`` every chunk it receives, for ``grace`` seconds
or until a manifest naming them commits; the commit (under the lock) checks that every chunk it names
is on disk, or fails with 409 naming the ones to send again, so even an upload slower than ``grace``
never commits a manifest with a swept chunk. Leases live in the server's memory; ``missing`` also
touches the chunk files, and a ``gc`` run by another process (``violin-snapshot-server gc``) keeps
every chunk younger than ``grace`` instead. A sweep killed midway has removed only unreferenced
chunks; temp files older than ``grace`` are swept too.

The old layout (``FileStore``'s, in the same directory) stays readable: its snapshots are listed,
opened, indexed and deleted as they are, so existing snapshots stay restorable (the dotted
directories above are invisible to a FileStore, whose names never start with a dot). New files
always go to the chunk layout.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from violin_core.catalogue import fsync_dir, write_atomic

from . import chunking
from .base import NAME_RE, ChecksumMismatch, FileInfo, InvalidName, NotFound, Store, StoreError, check_names
from .files import INDEX, FileStore

GRACE = 3600.0


class MissingChunks(StoreError):
    """A manifest names chunks the store does not hold (``ids``); send them and commit again."""

    def __init__(self, message: str, ids: List[str]):
        super().__init__(message)
        self.ids = ids


class ChunkStore(Store):
    scheme = "chunks"

    def __init__(self, root: str, grace: float = GRACE, level: int = chunking.LEVEL,
                 clock=time.time):
        self.root = os.path.abspath(root)
        self.chunk_dir = os.path.join(self.root, ".chunks")
        self.manifest_dir = os.path.join(self.root, ".manifests")
        for directory in (self.chunk_dir, self.manifest_dir):
            os.makedirs(directory, exist_ok=True)
        self.legacy = FileStore(self.root)
        self.grace, self.level, self.clock = grace, level, clock
        self.thread_lock = threading.RLock()
        self._local = threading.local()
        self.leases: Dict[str, float] = {}  # chunk id -> until when no sweep may take it (uploads)

    # --- the lock: threads of this server and other processes (a gc or verify command) -----

    @contextlib.contextmanager
    def locked(self):
        with self.thread_lock:
            depth = getattr(self._local, "depth", 0)
            if depth:
                self._local.depth += 1
                try:
                    yield
                finally:
                    self._local.depth -= 1
                return
            with open(os.path.join(self.root, ".lock"), "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                self._local.depth = 1
                try:
                    yield
                finally:
                    self._local.depth = 0
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # --- chunks ---------------------------------------------------------------------------

    def chunk_path(self, cid: str) -> str:
        if not chunking.is_id(cid):
            raise InvalidName("bad chunk id %r: 64 lowercase hex digits" % (cid,))
        return os.path.join(self.chunk_dir, cid[:2], cid)

    def has(self, cid: str) -> bool:
        return os.path.exists(self.chunk_path(cid))

    def missing(self, ids: Iterable[str]) -> List[str]:
        """The ids (in order, once each) the store lacks; the others are touched, so that no sweep in
        the next ``grace`` seconds takes them before the uploader's manifest names them."""
        ids = list(dict.fromkeys(ids))
        paths = [self.chunk_path(cid) for cid in ids]
        lacking = []
        with self.locked():
            until = self.clock() + self.grace
            for cid, path in zip(ids, paths):
                try:
                    os.utime(path)
                    self.leases[cid] = until
                except FileNotFoundError:
                    lacking.append(cid)
        return lacking

    def store_chunks(self, chunks: Iterable[chunking.Chunk]) -> Dict[str, int]:
        """Store every chunk not yet held, each checked (content hashes to its id); durable on return.

        ``{"received", "stored", "stored_bytes"}``: stored counts only chunks this call wrote."""
        received = stored = stored_bytes = 0
        touched = set()
        for chunk in chunks:
            received += 1
            chunking.unpack(chunk.id, chunk.size, chunk.packed)  # ChunkError (a ValueError): 400
            path = self.chunk_path(chunk.id)
            with self.thread_lock:
                self.leases[chunk.id] = self.clock() + self.grace
            if os.path.exists(path):
                continue
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.get_ident())
            try:
                with open(tmp, "wb") as handle:
                    handle.write(chunk.packed)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            touched.add(directory)
            stored, stored_bytes = stored + 1, stored_bytes + len(chunk.packed)
        for directory in touched:
            fsync_dir(directory)
        return {"received": received, "stored": stored, "stored_bytes": stored_bytes}

    def read_chunk(self, cid: str, size: int, where: str = "") -> bytes:
        """A chunk's content, checked; NotFound or ChunkError naming it."""
        try:
            with open(self.chunk_path(cid), "rb") as handle:
                packed = handle.read()
        except FileNotFoundError:
            raise NotFound("chunk %s%s is missing" % (cid, where)) from None
        return chunking.unpack(cid, size, packed, where)

    def packed_chunk(self, cid: str) -> bytes:
        try:
            with open(self.chunk_path(cid), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise NotFound("chunk %s is missing" % cid) from None

    # --- manifests ------------------------------------------------------------------------

    def _member_dir(self, snapshot: str, member: str) -> str:
        check_names(snapshot, member)
        return os.path.join(self.manifest_dir, snapshot, member)

    def _read_index(self, snapshot: str, member: str) -> Optional[dict]:
        try:
            with open(os.path.join(self._member_dir(snapshot, member), INDEX)) as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def manifest(self, snapshot: str, member: str, name: str) -> dict:
        """A file's entry: {name, bytes, sha256, chunks: [[id, size], ...]}; NotFound if none."""
        index = self._read_index(snapshot, member)
        for entry in (index or {}).get("files", []):
            if entry["name"] == name:
                return entry
        raise NotFound("no file %s/%s/%s" % (snapshot, member, name))

    def commit(self, snapshot: str, member: str, name: str, size: int, sha256: str,
               chunks: List[list]) -> FileInfo:
        """Make file ``name`` the one made of ``chunks`` ([[id, size], ...], every one already stored);
        ``MissingChunks`` naming those that are not (nothing changes then)."""
        check_names(snapshot, member, name)
        if name == INDEX:
            raise InvalidName("%s is the store's own index, not an image file name" % INDEX)
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise ValueError("sha256 must be 64 hex digits")
        entries = []
        for item in chunks:
            if not (isinstance(item, list) and len(item) == 2 and chunking.is_id(item[0])
                    and isinstance(item[1], int) and 0 < item[1] <= chunking.MAX):
                raise ValueError("chunks must be [[id, size], ...] with 64-hex ids and sizes in 1..%d" % chunking.MAX)
            entries.append([item[0], item[1]])
        if sum(s for _, s in entries) != size:
            raise ValueError("the chunks' sizes add up to %d, not %d" % (sum(s for _, s in entries), size))
        info = FileInfo(name, size, sha256.lower())
        directory = self._member_dir(snapshot, member)
        with self.locked():
            lacking = [cid for cid in dict.fromkeys(c for c, _ in entries) if not self.has(cid)]
            if lacking:
                raise MissingChunks("%d chunks of %s/%s/%s are not stored (first: %s)" % (
                    len(lacking), snapshot, member, name, lacking[0]), lacking)
            os.makedirs(directory, exist_ok=True)
            fsync_dir(os.path.dirname(directory))
            index = self._read_index(snapshot, member) or {"snapshot": snapshot, "member": member, "files": []}
            index["files"] = [f for f in index["files"] if f["name"] != name] + [dict(info.as_dict(), chunks=entries)]
            write_atomic(os.path.join(directory, INDEX), json.dumps(index).encode())
            for cid, _ in entries:  # referenced now: the manifest keeps them
                self.leases.pop(cid, None)
        return info

    # --- the Store interface --------------------------------------------------------------

    def put(self, snapshot: str, member: str, name: str, chunks: Iterable[bytes],
            expected_sha256: Optional[str] = None) -> FileInfo:
        """A whole file (an old client, or a plain PUT): cut and stored here, then committed."""
        check_names(snapshot, member, name)
        if name == INDEX:
            raise InvalidName("%s is the store's own index, not an image file name" % INDEX)
        digest, entries, total = hashlib.sha256(), [], [0]

        def counted():
            for piece in chunks:
                digest.update(piece)
                total[0] += len(piece)
                yield piece

        packer = chunking.Packer(self.level)
        for group in chunking.batches(packer.cut(chunking.IterReader(counted()))):
            self.store_chunks(group)
            entries.extend([c.id, c.size] for c in group)
        checksum = digest.hexdigest()
        if expected_sha256 and expected_sha256.lower() != checksum:
            raise ChecksumMismatch("checksum mismatch for %s: sent %s, received %s" % (name, expected_sha256, checksum))
        return self.commit(snapshot, member, name, total[0], checksum, entries)

    def open(self, snapshot: str, member: str, name: str) -> Tuple[Iterator[bytes], FileInfo]:
        if self._read_index(snapshot, member) is None and self.legacy.index(snapshot, member) is not None:
            return self.legacy.open(snapshot, member, name)
        entry = self.manifest(snapshot, member, name)
        where = " (of %s/%s/%s)" % (snapshot, member, name)
        return (self.read_chunk(cid, size, where) for cid, size in entry["chunks"]), \
            FileInfo(entry["name"], entry["bytes"], entry["sha256"])

    def index(self, snapshot: str, member: str) -> Optional[List[FileInfo]]:
        index = self._read_index(snapshot, member)
        if index is None:
            return self.legacy.index(snapshot, member)
        return [FileInfo(f["name"], f["bytes"], f["sha256"]) for f in index.get("files", [])]

    def delete(self, snapshot: str, member: Optional[str] = None) -> bool:
        check_names(snapshot, *([member] if member is not None else []))
        path = os.path.join(self.manifest_dir, snapshot) if member is None else self._member_dir(snapshot, member)
        with self.locked():
            found = os.path.isdir(path)
            if found:
                trash = os.path.join(self.manifest_dir, ".trash-%d-%d" % (os.getpid(), threading.get_ident()))
                os.replace(path, trash)  # atomic: the manifests are gone at once, whatever happens next
                fsync_dir(os.path.dirname(path))
                shutil.rmtree(trash)
            legacy = self.legacy.delete(snapshot, member)
            if found:
                self.gc()
        return found or legacy

    def snapshots(self) -> List[str]:
        names = set(self.legacy.snapshots())
        names.update(n for n in os.listdir(self.manifest_dir) if NAME_RE.match(n)
                     and any(NAME_RE.match(m) for m in os.listdir(os.path.join(self.manifest_dir, n))))
        return sorted(names)

    def _indexes(self) -> Iterator[dict]:
        for snapshot in sorted(os.listdir(self.manifest_dir)):
            if not NAME_RE.match(snapshot):
                continue
            for member in sorted(os.listdir(os.path.join(self.manifest_dir, snapshot))):
                if NAME_RE.match(member):
                    index = self._read_index(snapshot, member)
                    if index is not None:
                        yield index

    def _chunk_files(self) -> Iterator[Tuple[str, str]]:
        """(id or temp name, path) of everything under .chunks."""
        for prefix in os.listdir(self.chunk_dir):
            directory = os.path.join(self.chunk_dir, prefix)
            if os.path.isdir(directory):
                for name in os.listdir(directory):
                    yield name, os.path.join(directory, name)

    def totals(self) -> dict:
        legacy = self.legacy.totals()
        files, logical, referenced = legacy["files"], legacy["bytes"], set()
        for index in self._indexes():
            for entry in index["files"]:
                files, logical = files + 1, logical + entry["bytes"]
                referenced.update(c for c, _ in entry["chunks"])
        chunks = stored = 0
        for name, path in self._chunk_files():
            if chunking.is_id(name):
                try:
                    stored += os.path.getsize(path)
                    chunks += 1
                except FileNotFoundError:
                    pass
        return {"snapshots": len(self.snapshots()), "files": files, "bytes": logical,
                "logical_bytes": logical, "stored_bytes": stored + legacy["bytes"], "chunks": chunks,
                "chunk_bytes": stored, "legacy_bytes": legacy["bytes"], "referenced_chunks": len(referenced)}

    # --- garbage collection and verification ----------------------------------------------

    def gc(self, min_age: float = 0.0) -> dict:
        """Sweep chunks no manifest names and no upload holds a lease on, and younger than ``min_age``
        seconds (another process's gc: it cannot see this server's leases); temp files older than ``grace``."""
        with self.locked():
            marked = set()
            for index in self._indexes():
                for entry in index["files"]:
                    marked.update(c for c, _ in entry["chunks"])
            now = self.clock()
            self.leases = {cid: until for cid, until in self.leases.items() if until > now}
            marked.update(self.leases)
            swept = freed = kept_young = 0
            for name, path in list(self._chunk_files()):
                if name in marked:
                    continue
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    continue
                if stat.st_mtime > now - (min_age if chunking.is_id(name) else self.grace):
                    kept_young += 1
                    continue
                os.unlink(path)
                if chunking.is_id(name):
                    swept, freed = swept + 1, freed + stat.st_size
            return {"swept": swept, "freed_bytes": freed, "kept_young": kept_young, "referenced": len(marked)}

    def verify(self) -> dict:
        """Check every manifest's chunks (present, decompress, hash) and every file's sha256, and the
        old layout's files; ``{"ok", "files", "chunks", "damaged": [{snapshot, member, file, chunk?, problem}]}``."""
        damaged, files, checked = [], 0, {}
        for index in list(self._indexes()):
            snapshot, member = index["snapshot"], index["member"]
            for entry in index["files"]:
                files += 1
                digest, problem = hashlib.sha256(), None
                for cid, size in entry["chunks"]:
                    try:
                        data = self.read_chunk(cid, size)
                        checked[cid] = None
                    except (NotFound, chunking.ChunkError) as error:
                        if self._read_index(snapshot, member) is None:  # deleted meanwhile: not damage
                            problem = "gone"
                            break
                        damaged.append({"snapshot": snapshot, "member": member, "file": entry["name"],
                                        "chunk": cid, "problem": str(error)})
                        problem = "chunk"
                        continue
                    digest.update(data)
                if problem is None and digest.hexdigest() != entry["sha256"]:
                    damaged.append({"snapshot": snapshot, "member": member, "file": entry["name"],
                                    "problem": "sha256 %s, expected %s" % (digest.hexdigest(), entry["sha256"])})
        for snapshot in self.legacy.snapshots():
            for member in filter(NAME_RE.match, os.listdir(os.path.join(self.root, snapshot))):
                for info in self.legacy.index(snapshot, member) or []:
                    files += 1
                    try:
                        pieces, _ = self.legacy.open(snapshot, member, info.name)
                        digest = hashlib.sha256()
                        for piece in pieces:
                            digest.update(piece)
                        if digest.hexdigest() != info.sha256:
                            raise StoreError("sha256 %s, expected %s" % (digest.hexdigest(), info.sha256))
                    except (OSError, StoreError) as error:
                        damaged.append({"snapshot": snapshot, "member": member, "file": info.name,
                                        "problem": str(error)})
        return {"ok": not damaged, "root": self.root, "files": files, "chunks": len(checked), "damaged": damaged}
