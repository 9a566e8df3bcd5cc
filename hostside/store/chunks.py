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
import re
import threading
import time
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from violin_core.catalogue import fsync_dir, write_atomic

from . import chunking
from .base import NAME_RE, ChecksumMismatch, FileInfo, InvalidName, NotFound, Store, StoreError, check_names
from .files import INDEX, FileStore, remove_renamed_tree

GRACE = 3600.0
PACK_RE = re.compile(r"^[0-9a-f]{32}\.pack$")


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
        self.pack_dir = os.path.join(self.root, ".packs")
        self.manifest_dir = os.path.join(self.root, ".manifests")
        for directory in (self.pack_dir, self.manifest_dir):
            os.makedirs(directory, exist_ok=True)
        self.legacy = FileStore(self.root)
        self.grace, self.level, self.clock = grace, level, clock
        self.thread_lock = threading.RLock()
        self._local = threading.local()
        self.leases: Dict[str, float] = {}  # chunk id -> until when no sweep may take it (uploads)
        self.where: Dict[str, Tuple[str, int, int, int]] = {}  # chunk id -> (pack, offset, length, size)
        self.damaged_packs: Dict[str, str] = {}  # pack -> why its tail could not be read
        self._scan()

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

    # --- chunks, in pack files ------------------------------------------------------------

    def _scan(self) -> None:
        """Rebuild the chunk index from the packs on disk (at start, or when a pack went away)."""
        where: Dict[str, Tuple[str, int, int, int]] = {}
        damaged = {}
        for name in sorted(os.listdir(self.pack_dir)):
            if PACK_RE.match(name):
                try:
                    for cid, offset, length, size in chunking.scan_pack(os.path.join(self.pack_dir, name)):
                        where.setdefault(cid, (name, offset, length, size))
                except FileNotFoundError:
                    continue
                except chunking.ChunkError as error:  # a damaged tail: the chunks before it still count
                    damaged[name] = str(error)
        with self.thread_lock:
            self.where, self.damaged_packs = where, damaged

    def has(self, cid: str) -> bool:
        return cid in self.where

    def _present(self, cid: str) -> bool:
        """In the index and its pack still on disk (another process's gc may have repacked it)."""
        spot = self.where.get(cid)
        return spot is not None and os.path.exists(os.path.join(self.pack_dir, spot[0]))

    def missing(self, ids: Iterable[str]) -> List[str]:
        """The ids (in order, once each) the store lacks. The others are leased for ``grace`` seconds
        (no sweep takes them before the uploader's manifest names them) and their packs touched (no
        other process's gc takes those packs for ``grace`` either)."""
        ids = list(dict.fromkeys(ids))
        for cid in ids:
            if not chunking.is_id(cid):
                raise InvalidName("bad chunk id %r: 64 lowercase hex digits" % (cid,))
        lacking, packs = [], set()
        with self.locked():
            until = self.clock() + self.grace
            for cid in ids:
                spot = self.where.get(cid)
                if spot is None:
                    lacking.append(cid)
                else:
                    self.leases[cid] = until
                    packs.add(spot[0])
            for name in packs:
                try:
                    os.utime(os.path.join(self.pack_dir, name))
                except FileNotFoundError:  # repacked by another process meanwhile: ask again after a scan
                    self._scan()
                    return self.missing(ids)
        return lacking

    def store_chunks(self, chunks: Iterable[chunking.Chunk]) -> Dict[str, int]:
        """Store every chunk not yet held, each checked (content hashes to its id), in one new pack
        (temp + fsync + rename + fsync of the directory: durable on return, one fsync for all).

        ``{"received", "stored", "stored_bytes"}``: stored counts only chunks this call wrote."""
        received, spots = 0, {}
        name = "%s.pack" % uuid.uuid4().hex
        tmp = os.path.join(self.pack_dir, ".%s.tmp" % name)
        offset = 0
        try:
            with open(tmp, "wb") as handle:
                for chunk in chunks:
                    received += 1
                    chunking.unpack(chunk.id, chunk.size, chunk.packed)  # ChunkError (a ValueError): 400
                    with self.thread_lock:
                        self.leases[chunk.id] = self.clock() + self.grace
                        if chunk.id in self.where or chunk.id in spots:
                            continue
                    handle.write(chunking.frame(chunk))
                    spots[chunk.id] = (name, offset + chunking.HEAD_SIZE, len(chunk.packed), chunk.size)
                    offset += chunking.HEAD_SIZE + len(chunk.packed)
                if spots:
                    handle.flush()
                    os.fsync(handle.fileno())
            if spots:
                os.replace(tmp, os.path.join(self.pack_dir, name))
                fsync_dir(self.pack_dir)
                with self.thread_lock:
                    for cid, spot in spots.items():
                        self.where.setdefault(cid, spot)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return {"received": received, "stored": len(spots), "stored_bytes": offset}

    def packed_chunks(self, ids: Iterable[str]) -> Tuple[List[bytes], List[str]]:
        """The compressed bytes of ``ids`` (in order) and the ids the store lacks; one open per pack."""
        handles, found, lacking = {}, [], []
        try:
            for cid in ids:
                spot = self.where.get(cid)
                try:
                    if spot is None:
                        raise FileNotFoundError(cid)
                    if spot[0] not in handles:
                        handles[spot[0]] = open(os.path.join(self.pack_dir, spot[0]), "rb")
                    handle = handles[spot[0]]
                    handle.seek(spot[1])
                    found.append(handle.read(spot[2]))
                except FileNotFoundError:
                    try:
                        found.append(self.packed_chunk(cid))  # rescans: repacked meanwhile?
                    except NotFound:
                        lacking.append(cid)
        finally:
            for handle in handles.values():
                handle.close()
        return found, lacking

    def frame_ranges(self, ids: Iterable[str]):
        """``(handles, ranges)``: the chunk frames of ``ids`` in order as byte ranges ``(handle, offset,
        length)`` of their packs (adjacent frames of one pack merged), every pack already open (a gc
        that removes one meanwhile cannot take its bytes from under the reader); None if a chunk is
        not in the index or its pack is gone (the caller falls back to ``packed_chunks``). Close the handles."""
        handles, ranges = {}, []
        try:
            for cid in ids:
                spot = self.where.get(cid)
                if spot is None:
                    raise FileNotFoundError(cid)
                if spot[0] not in handles:
                    handles[spot[0]] = open(os.path.join(self.pack_dir, spot[0]), "rb")
                start, length = spot[1] - chunking.HEAD_SIZE, chunking.HEAD_SIZE + spot[2]
                last = ranges[-1] if ranges else None
                if last is not None and last[0] is handles[spot[0]] and last[1] + last[2] == start:
                    ranges[-1] = (last[0], last[1], last[2] + length)
                else:
                    ranges.append((handles[spot[0]], start, length))
        except FileNotFoundError:
            for handle in handles.values():
                handle.close()
            return None
        return list(handles.values()), ranges

    def packed_chunk(self, cid: str) -> bytes:
        """A chunk's compressed bytes as stored (not checked: the reader checks); NotFound if none."""
        for attempt in (1, 2):
            spot = self.where.get(cid)
            if spot is not None:
                try:
                    with open(os.path.join(self.pack_dir, spot[0]), "rb") as handle:
                        handle.seek(spot[1])
                        return handle.read(spot[2])
                except FileNotFoundError:
                    pass
            if attempt == 1:
                self._scan()  # a pack repacked or removed by another process's gc
        raise NotFound("chunk %s is missing" % cid)

    def read_chunk(self, cid: str, size: int, where: str = "") -> bytes:
        """A chunk's content, checked; NotFound or ChunkError naming it."""
        try:
            packed = self.packed_chunk(cid)
        except NotFound:
            raise NotFound("chunk %s%s is missing" % (cid, where)) from None
        return chunking.unpack(cid, size, packed, where)

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

    def manifests(self, snapshot: str, member: str) -> dict:
        """Every file's entry of a member's image in one answer: {snapshot, member, files: [entry, ...]};
        NotFound if the member has no manifests here (none, or only files of the old layout)."""
        index = self._read_index(snapshot, member)
        if index is None:
            raise NotFound("no manifests for %s/%s" % (snapshot, member))
        return {"snapshot": snapshot, "member": member, "files": index.get("files", [])}

    def commit(self, snapshot: str, member: str, name: str, size: int, sha256: str,
               chunks: List[list], checksum: Optional[str] = None) -> FileInfo:
        """Make file ``name`` the one made of ``chunks`` ([[id, size], ...], every one already stored);
        ``MissingChunks`` naming those that are not (nothing changes then). ``sha256`` is the content's,
        or with ``checksum`` ``chunking.LIST_CHECKSUM`` the chunk list's (checked here)."""
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
        if checksum not in (None, chunking.LIST_CHECKSUM):
            raise ValueError("checksum must be absent or %r, got %r" % (chunking.LIST_CHECKSUM, checksum))
        if checksum and chunking.list_checksum(entries) != sha256.lower():
            raise ChecksumMismatch("the chunk list of %s hashes to %s, not %s" % (name, chunking.list_checksum(entries), sha256))
        info = FileInfo(name, size, sha256.lower())
        directory = self._member_dir(snapshot, member)
        with self.locked():
            lacking = [cid for cid in dict.fromkeys(c for c, _ in entries) if not self._present(cid)]
            if lacking:  # another process's gc may have repacked them: look again before refusing
                self._scan()
                lacking = [cid for cid in lacking if not self._present(cid)]
            if lacking:
                raise MissingChunks("%d chunks of %s/%s/%s are not stored (first: %s)" % (
                    len(lacking), snapshot, member, name, lacking[0]), lacking)
            if not os.path.isdir(directory):  # (the member's later files: no directory made, none to sync)
                os.makedirs(directory, exist_ok=True)
                fsync_dir(os.path.dirname(directory))
            index = self._read_index(snapshot, member) or {"snapshot": snapshot, "member": member, "files": []}
            entry = dict(info.as_dict(), chunks=entries, **({"checksum": checksum} if checksum else {}))
            index["files"] = [f for f in index["files"] if f["name"] != name] + [entry]
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

        packer = chunking.packer_for(name)
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
                remove_renamed_tree(trash)  # (a file still coming in may land in it meanwhile)
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

    def _packs(self) -> Dict[str, List[Tuple[str, int, int, int]]]:
        """pack name -> the chunks the index places in it."""
        packs: Dict[str, list] = {}
        for cid, spot in self.where.items():
            packs.setdefault(spot[0], []).append((cid,) + spot[1:])
        return packs

    def totals(self) -> dict:
        legacy = self.legacy.totals()
        files, logical, referenced = legacy["files"], legacy["bytes"], set()
        for index in self._indexes():
            for entry in index["files"]:
                files, logical = files + 1, logical + entry["bytes"]
                referenced.update(c for c, _ in entry["chunks"])
        stored = packs = 0
        for name in os.listdir(self.pack_dir):
            if PACK_RE.match(name):
                try:
                    stored += os.path.getsize(os.path.join(self.pack_dir, name))
                    packs += 1
                except FileNotFoundError:
                    pass
        return {"snapshots": len(self.snapshots()), "files": files, "bytes": logical,
                "logical_bytes": logical, "stored_bytes": stored + legacy["bytes"], "chunks": len(self.where),
                "packs": packs, "chunk_bytes": stored, "legacy_bytes": legacy["bytes"],
                "referenced_chunks": len(referenced)}

    # --- garbage collection and verification ----------------------------------------------

    def gc(self, min_age: float = 0.0) -> dict:
        """Mark the chunks manifests name or uploads hold leases on; sweep the rest: a pack with no
        live chunk is removed, one less than half live is rewritten with its live chunks (new pack
        durable first, then the old one removed). Packs younger than ``min_age`` seconds are left
        alone (another process's gc: it cannot see this server's leases); temp files older than ``grace`` go."""
        with self.locked():
            self._scan()
            marked = set()
            for index in self._indexes():
                for entry in index["files"]:
                    marked.update(c for c, _ in entry["chunks"])
            now = self.clock()
            self.leases = {cid: until for cid, until in self.leases.items() if until > now}
            marked.update(self.leases)
            swept = freed = kept_young = repacked = 0
            for name in os.listdir(self.pack_dir):
                if name.endswith(".tmp") and now - os.stat(os.path.join(self.pack_dir, name)).st_mtime > self.grace:
                    os.unlink(os.path.join(self.pack_dir, name))
            for name, chunks in self._packs().items():
                path = os.path.join(self.pack_dir, name)
                live = [c for c in chunks if c[0] in marked]
                if len(live) == len(chunks):
                    continue
                try:
                    stat = os.stat(path)
                except FileNotFoundError:
                    continue
                if stat.st_mtime > now - min_age:
                    kept_young += 1
                    continue
                dead_bytes = sum(chunking.HEAD_SIZE + c[2] for c in chunks if c[0] not in marked)
                if live and dead_bytes * 2 < stat.st_size:
                    continue  # mostly live: not worth rewriting yet
                if live:
                    self.store_chunks(chunking.Chunk(cid, size, self._read_at(name, offset, length))
                                      for cid, offset, length, size in live
                                      if self.where.pop(cid, None) is not None)
                    repacked += 1
                else:
                    for cid, *_ in chunks:
                        self.where.pop(cid, None)
                os.unlink(path)
                swept, freed = swept + len(chunks) - len(live), freed + dead_bytes
            if swept:
                fsync_dir(self.pack_dir)
            return {"swept": swept, "freed_bytes": freed, "kept_young": kept_young, "repacked": repacked,
                    "referenced": len(marked)}

    def _read_at(self, pack: str, offset: int, length: int) -> bytes:
        with open(os.path.join(self.pack_dir, pack), "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

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
                got = chunking.list_checksum(entry["chunks"]) if entry.get("checksum") == chunking.LIST_CHECKSUM \
                    else digest.hexdigest()
                if problem is None and got != entry["sha256"]:
                    damaged.append({"snapshot": snapshot, "member": member, "file": entry["name"],
                                    "problem": "%s %s, expected %s" % (entry.get("checksum", "sha256"), got, entry["sha256"])})
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
        self._scan()
        damaged += [{"pack": name, "problem": why} for name, why in sorted(self.damaged_packs.items())]
        return {"ok": not damaged, "root": self.root, "files": files, "chunks": len(checked), "damaged": damaged}
