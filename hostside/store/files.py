"""``FileStore``: one plain file per image file, the layout violin-snapshot-server has always used.

    <root>/<snapshot>/<member>/<file>         the file, byte for byte
    <root>/<snapshot>/<member>/index.json     {"snapshot", "member", "files": [{name, bytes, sha256}]}

A file is written to ``.<file>.part-<pid>-<thread>`` beside its final name, fsynced and renamed, and
then the member's ``index.json`` is rewritten the same way (``write_atomic``); only files named in
the index are visible, so a crash at any point leaves at most a stray ``.part`` file, never a file
that seems complete and is not.
"""

import errno
import hashlib
import json
import os
import shutil
import threading
from typing import Iterable, Iterator, List, Optional, Tuple

from violin_core.catalogue import fsync_dir, write_atomic

from .base import CHUNK, NAME_RE, ChecksumMismatch, FileInfo, InvalidName, NotFound, Store, check_names

INDEX = "index.json"


class FileStore(Store):
    scheme = "file"

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()  # one rename + index rewrite at a time: the index names what is on disk
        os.makedirs(root, exist_ok=True)

    def _member_dir(self, snapshot: str, member: str) -> str:
        check_names(snapshot, member)
        return os.path.join(self.root, snapshot, member)

    def _read_index(self, snapshot: str, member: str) -> Optional[dict]:
        try:
            with open(os.path.join(self._member_dir(snapshot, member), INDEX)) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def index(self, snapshot: str, member: str) -> Optional[List[FileInfo]]:
        index = self._read_index(snapshot, member)
        if index is None:
            return None
        return [FileInfo(f["name"], f["bytes"], f["sha256"]) for f in index.get("files", [])]

    def put(self, snapshot: str, member: str, name: str, chunks: Iterable[bytes],
            expected_sha256: Optional[str] = None) -> FileInfo:
        check_names(name)
        if name == INDEX:
            raise InvalidName("%s is the store's own index, not an image file name" % INDEX)
        directory = self._member_dir(snapshot, member)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, ".%s.part-%d-%d" % (name, os.getpid(), threading.get_ident()))
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
                    received += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            info = FileInfo(name, received, digest.hexdigest())
            if expected_sha256 and expected_sha256.lower() != info.sha256:
                raise ChecksumMismatch("checksum mismatch for %s: sent %s, received %s"
                                       % (name, expected_sha256, info.sha256))
            with self.lock:
                os.replace(tmp, os.path.join(directory, name))
                fsync_dir(directory)
                index = self._read_index(snapshot, member) or {"snapshot": snapshot, "member": member, "files": []}
                index["files"] = [f for f in index["files"] if f["name"] != name] + [info.as_dict()]
                write_atomic(os.path.join(directory, INDEX), json.dumps(index, indent=1).encode())
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return info

    def open(self, snapshot: str, member: str, name: str) -> Tuple[Iterator[bytes], FileInfo]:
        with self.lock:  # the index entry and the file opened are the same version, whatever put runs next
            info = next((f for f in self.index(snapshot, member) or [] if f.name == name), None)
            if info is None:
                raise NotFound("no file %s/%s/%s" % (snapshot, member, name))
            try:
                handle = open(os.path.join(self._member_dir(snapshot, member), name), "rb")
            except FileNotFoundError:
                raise NotFound("file %s/%s/%s is in the index but not on disk" % (snapshot, member, name)) from None
        return _chunks_of(handle), info

    def delete(self, snapshot: str, member: Optional[str] = None) -> bool:
        check_names(snapshot, *([member] if member is not None else []))
        path = os.path.join(self.root, snapshot) if member is None else self._member_dir(snapshot, member)
        with self.lock:  # two deletes of one snapshot at once: one deletes it, the other finds nothing
            if not os.path.isdir(path):
                return False
            remove_tree(path)
            fsync_dir(os.path.dirname(path))  # under the lock: a delete of the whole snapshot may follow at once
        return True

    def snapshots(self) -> List[str]:
        return sorted(name for name in os.listdir(self.root)
                      if NAME_RE.match(name) and os.path.isdir(os.path.join(self.root, name)))

    def totals(self) -> dict:
        snapshots, files, size = self.snapshots(), 0, 0
        for snapshot in snapshots:
            for member in filter(NAME_RE.match, os.listdir(os.path.join(self.root, snapshot))):
                for info in self.index(snapshot, member) or []:
                    files, size = files + 1, size + info.bytes
        return {"snapshots": len(snapshots), "files": files, "bytes": size}


def remove_tree(path: str) -> None:
    """Delete the directory ``path`` even while a file still comes into it (a file created meanwhile
    failed ``shutil.rmtree`` with "Directory not empty": a 500). It is renamed away first, so nothing
    new lands in it by its path (such a writer finds its directory gone: 409), then removed."""
    trash = os.path.join(os.path.dirname(path), ".deleting-%d-%d-%s" % (
        os.getpid(), threading.get_ident(), os.path.basename(path)))
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    remove_renamed_tree(trash)


def remove_renamed_tree(trash: str, attempts: int = 20) -> None:
    """``shutil.rmtree`` of a directory already renamed away from its path: a file opened by that path
    just before the rename may still be created in it meanwhile, so it is tried again."""
    for attempt in range(attempts):
        try:
            shutil.rmtree(trash)
            return
        except FileNotFoundError:  # a file renamed within it meanwhile: look again
            if not os.path.lexists(trash):
                return
        except OSError as error:
            if error.errno != errno.ENOTEMPTY or attempt == attempts - 1:
                raise


def _chunks_of(handle) -> Iterator[bytes]:
    with handle:
        yield from iter(lambda: handle.read(CHUNK), b"")
