"""The images a helper stored last, kept on its own disk so that a restore here need not download them.

A member's image directory, once the snapshot server has it (every file and checksum), is renamed into
``<work_dir>/kept/<member>/<snapshot>`` instead of being removed, and its file list (name, bytes,
sha256: what the snapshot's manifest records) is written beside it as ``<snapshot>.json``, atomically
and last: a directory without its list is a keep cut short and is never used. The newest ``keep``
per member stay (default ``KEEP_IMAGES``); older ones are removed.

Staging a member here for a snapshot whose image is kept hard-links the kept files into the restore
directory and checks each one's sha256 against the list the controller sent (the snapshot's own);
anything missing, extra or different and the stage downloads from the server as before. A restore
from a kept image is therefore the image the server holds, byte for byte, checked as a download is.

A member's directory stored as a tree (``workdir.tar.tree``: the capture's copy, stored as the tar
``workdir.tar`` without writing it, checked by its chunk list) is kept by moving that copy in as well,
as ``<snapshot>/.trees/workdir.tar``; staging writes the tar from it (``hostside.store.tree``, the very
pieces the upload sent) and checks the chunk list's checksum. A copy on another filesystem (a clone
beside the member's directory) is not moved: then the image is not kept. Restored on another helper,
an image is downloaded.

A VM's image is its migration stream, which the helper writes to its disk as it uploads it when it
keeps images (``LibvirtBackend``), with its disks' standalone copies. Those disk files are ``private``:
the restored guest writes to the file it is given, so staging copies them instead of linking them.

8 CRIU members of ~8 MiB restored at once on 2 cores: staging one after another from the server took
439 ms of the restore's 789 (12-02 16:2x); its share of the slice's CPU went to HTTP, zstd and BLAKE3.
"""

import json
import logging
import os
import shutil
import threading
import time
from typing import Dict, List, Optional, Sequence

from hostside.store import chunking, tree
from hostside.store.client import sha256_file
from violin_core.catalogue import write_atomic

LOG = logging.getLogger("violin-helper")
KEEP_IMAGES = 1  # newest images kept per member (0: none kept)
LIST = ".json"  # beside each kept directory: its file list
TREES = ".trees"  # in a kept directory: the directories stored as tars


class KeptImages:
    """The newest ``keep`` stored images of each member under ``root``."""

    def __init__(self, root: str, keep: int = KEEP_IMAGES, clock=time.monotonic):
        self.root, self.keep, self.clock = root, keep, clock
        self.lock = threading.Lock()  # renames, lists and removals; checksums are read outside it

    def _member_dir(self, member: str) -> str:
        return os.path.join(self.root, member)

    def take(self, member: str, snapshot: str, directory: str, files: List[dict],
             trees: Optional[Dict[str, str]] = None, private: Sequence[str] = ()) -> bool:
        """Keep ``directory`` (moved, not copied) as ``member``'s image of ``snapshot``, stored as ``files``;
        ``trees``: stored file name -> the directory its tree pointer names (moved in too); ``private``:
        the names a restore writes to (staged as copies).

        False (nothing moved) when nothing is kept, or the directory is not exactly the stored files,
        each under its own name or as a tree pointer for one of ``trees``."""
        if self.keep < 1:
            return False
        trees = trees or {}
        try:
            present = sorted(os.listdir(directory))
        except OSError:
            return False
        stored = sorted(f["name"] + tree.POINTER if f["name"] in trees else f["name"] for f in files)
        if present != stored or not all(os.path.isfile(os.path.join(directory, n)) for n in present):
            LOG.info("image %s/%s not kept here: the directory holds %s, the store %s", snapshot, member,
                     sorted(set(present) - set(stored)) or "no more", sorted(set(stored) - set(present)) or "no more")
            return False
        place = self._member_dir(member)
        target = os.path.join(place, snapshot)
        moved = os.path.join(place, ".%s%s" % (snapshot, TREES))  # the trees, renamed into the image with it
        with self.lock:
            try:
                os.makedirs(place, exist_ok=True)
                device = os.stat(place).st_dev
                elsewhere = [root for root in trees.values() if os.stat(root).st_dev != device]
                if elsewhere:  # e.g. a clone beside the member's directory on its own filesystem
                    LOG.info("image %s/%s not kept here: %s is on another filesystem", snapshot, member, elsewhere[0])
                    return False
                self._remove(member, snapshot)
                os.makedirs(moved)
                for name, root in trees.items():
                    os.rename(root, os.path.join(moved, name))  # EXDEV: a clone on the member's filesystem
                    os.unlink(os.path.join(directory, name + tree.POINTER))
                os.rename(moved, os.path.join(directory, TREES))
                os.rename(directory, target)
                listing = {"snapshot": snapshot, "kept": time.time(),
                           "files": [dict({k: f[k] for k in ("name", "bytes", "sha256")}, tree=f["name"] in trees,
                                          copy=f["name"] in private) for f in files]}
                write_atomic(target + LIST, json.dumps(listing).encode())
            except OSError as error:
                LOG.warning("image %s/%s not kept: %s", snapshot, member, error)
                self._remove(member, snapshot)
                shutil.rmtree(moved, ignore_errors=True)
                return False
            self._prune(member)
        return True

    def snapshots(self, member: str) -> List[str]:
        """The snapshots whose image of ``member`` is kept, oldest first."""
        place = self._member_dir(member)
        try:
            names = os.listdir(place)
        except OSError:
            return []
        kept = []
        for name in names:
            if not name.endswith(LIST) or not os.path.isdir(os.path.join(place, name[:-len(LIST)])):
                continue
            try:
                kept.append((os.stat(os.path.join(place, name)).st_mtime_ns, name[:-len(LIST)]))
            except OSError:
                continue
        return [snapshot for _, snapshot in sorted(kept)]

    def _prune(self, member: str) -> None:
        """Leaves the newest ``keep`` and nothing half kept (a directory without its list)."""
        kept = self.snapshots(member)
        for snapshot in kept[:max(0, len(kept) - self.keep)]:
            self._remove(member, snapshot)
        place = self._member_dir(member)
        for name in os.listdir(place):
            path = os.path.join(place, name)
            if os.path.isdir(path) and not os.path.exists(path + LIST):
                shutil.rmtree(path, ignore_errors=True)
            elif ".tmp-" in name:
                os.unlink(path)

    def _remove(self, member: str, snapshot: str) -> None:
        path = os.path.join(self._member_dir(member), snapshot)
        try:
            os.unlink(path + LIST)  # first: from here on the directory is never used
        except FileNotFoundError:
            pass
        shutil.rmtree(path, ignore_errors=True)

    def forget(self, member: str, snapshot: Optional[str] = None) -> None:
        """Drop ``member``'s kept image of ``snapshot`` (all of them when None)."""
        with self.lock:
            if snapshot is None:
                shutil.rmtree(self._member_dir(member), ignore_errors=True)
            else:
                self._remove(member, snapshot)

    def stage(self, member: str, snapshot: str, files: List[dict], target: str) -> Optional[dict]:
        """Hard-link ``member``'s kept image of ``snapshot`` into ``target`` (made afresh) and check every
        file against ``files`` (the snapshot's list: name and sha256); what it found ({"files": [...],
        "check_ms"}), or None (``target`` removed) when the image is not kept or is not that one."""
        if self.keep < 1:
            return None
        source = os.path.join(self._member_dir(member), snapshot)
        expected = {f.get("name"): f.get("sha256") for f in files}
        began = self.clock()
        with self.lock:
            try:
                with open(source + LIST) as handle:
                    listing = json.load(handle)
                recorded = {f["name"]: f["sha256"] for f in listing["files"]}
                if listing.get("snapshot") != snapshot or recorded != expected:
                    return None
                trees = {f["name"] for f in listing["files"] if f.get("tree")}
                copies = {f["name"] for f in listing["files"] if f.get("copy")}
                shutil.rmtree(target, ignore_errors=True)
                os.makedirs(target)
                for name in set(expected) - trees - copies:
                    os.link(os.path.join(source, name), os.path.join(target, name))
            except (OSError, ValueError, KeyError, TypeError) as error:
                if not isinstance(error, FileNotFoundError) or os.path.exists(source + LIST):
                    LOG.warning("kept image %s/%s not used: %s", snapshot, member, error)
                shutil.rmtree(target, ignore_errors=True)
                return None
        for name, checksum in sorted(expected.items()):  # the links' own inodes: a prune cannot touch them
            try:
                if name in trees:
                    found = self._write_tar(os.path.join(source, TREES, name), os.path.join(target, name))
                elif name in copies:  # read outside the lock: a prune meanwhile fails the check, then it downloads
                    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
                    found = sha256_file(os.path.join(target, name))
                else:
                    found = sha256_file(os.path.join(target, name))  # (hashlib frees the GIL: on every core)
            except (OSError, tree.TreeChanged) as error:
                found = "unreadable (%s)" % error
            if found != checksum:
                LOG.warning("kept image %s/%s: %s has sha256 %s, the snapshot recorded %s; downloading it",
                            snapshot, member, name, found, checksum)
                shutil.rmtree(target, ignore_errors=True)
                self.forget(member, snapshot)
                return None
        return {"files": [{k: f[k] for k in ("name", "bytes", "sha256")} for f in listing["files"]],
                "check_ms": round((self.clock() - began) * 1000, 1)}

    @staticmethod
    def _write_tar(root: str, path: str) -> str:
        """Write the tar of the kept directory ``root`` to ``path`` as its upload cut it; the chunk list's
        checksum (what the snapshot recorded for it)."""
        entries = []
        with open(path, "wb") as handle:
            for piece in tree.TreeTar(root, chunking.Packer(), None, clone=False, trust=False).pieces():
                entries.append((piece.id, piece.size))
                handle.write(piece.data)
        return chunking.list_checksum(entries)
