"""The snapshot catalogue on disk: one directory per snapshot, written atomically.

``<dir>/<id>/manifest.json`` is the commit point: it is written last, through
a temporary file, fsync and rename, after the channel state it names. A
snapshot whose manifest says ``running`` when the controller starts was cut
short by a restart and is marked aborted; only ``complete`` ones are
``restorable``.
"""

import hashlib
import itertools
import json
import os
import posix
import re
import shutil
import threading
from typing import Callable, Dict, List, Optional

from . import channel

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
MANIFEST, CHANNEL = "manifest.json", "channel.pcapng"
_TEMP_NUMBERS = itertools.count()  # one name per write, even two at once in one thread


def fsync_dir(directory: str) -> None:
    # posix.open, not os.open: eventlet's green os.open (under ryu-manager) tells the calling thread's
    # hub about the descriptor, and called from a worker thread (save_later's write) it left the
    # controller's event loop answering nothing. Nothing in a write here may be a green call.
    fd = posix.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: str, data: bytes) -> str:
    """``data`` in a temporary file beside ``path``, fsynced; its name."""
    tmp = "%s.tmp-%d-%d-%d" % (path, os.getpid(), threading.get_ident(), next(_TEMP_NUMBERS))
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def write_atomic(path: str, data: bytes) -> None:
    """temp file + fsync + rename + fsync of the directory (safe from several threads)."""
    os.replace(write_temp(path, data), path)
    fsync_dir(os.path.dirname(path))


class Catalogue:
    def __init__(self, directory: str):
        self.directory = directory
        self.manifests: Dict[str, dict] = {}
        self._saved: Dict[str, int] = {}  # snapshot id -> how many saves of its manifest were asked for
        self._landed: Dict[str, int] = {}  # snapshot id -> the newest of them renamed into place

    def open(self) -> "Catalogue":
        """Create the directory if needed and load every manifest (marking interrupted ones)."""
        os.makedirs(self.directory, exist_ok=True)
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name, MANIFEST)
            if not ID_RE.match(name) or not os.path.isfile(path):
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    manifest = json.load(handle)
            except (OSError, ValueError):
                continue  # unreadable: never offered
            if manifest.get("state") == "running":
                manifest.update(state="aborted", phase="aborted", restorable=False,
                                reason="the controller restarted while the snapshot was running")
                self._write_manifest(manifest)
            self.manifests[manifest["id"]] = manifest
        return self

    def max_epoch(self) -> int:
        return max((m.get("epoch", 0) for m in self.manifests.values()), default=0)

    def list(self) -> List[dict]:
        return sorted(self.manifests.values(), key=lambda m: (m.get("created") or 0, m["id"]))

    def get(self, snapshot_id: str) -> Optional[dict]:
        return self.manifests.get(snapshot_id)

    def save(self, manifest: dict, frames: Optional[List[channel.ChannelFrame]] = None) -> dict:
        """Write the channel state (if any), then the manifest naming it."""
        manifest = dict(manifest)
        os.makedirs(os.path.join(self.directory, manifest["id"]), exist_ok=True)
        if frames is not None:
            data = channel.encode(frames)
            write_atomic(os.path.join(self.directory, manifest["id"], CHANNEL), data)
            manifest["channel"] = {"file": CHANNEL, "frames": len(frames), "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()}
        self._write_manifest(manifest)
        self.manifests[manifest["id"]] = manifest
        return manifest

    def save_later(self, manifest: dict, run_blocking: Callable[[Callable[[], object]], object]) -> bool:
        """Save ``manifest`` with its two fsyncs run through ``run_blocking`` (off the event loop: a
        worker thread, the caller's lock given up meanwhile; nothing in them may be a green call).
        Unless a later save of the same snapshot landed first (the final manifest, while this one's
        file was written), it is renamed into place. Whether it landed."""
        manifest = dict(manifest)
        snapshot_id = manifest["id"]
        self.manifests[snapshot_id] = manifest
        os.makedirs(os.path.join(self.directory, snapshot_id), exist_ok=True)
        return self._put_manifest(manifest, run_blocking)

    def load_extra(self, name: str) -> Optional[dict]:
        """A small JSON document of the controller's kept beside the snapshots (e.g. the schedule)."""
        try:
            with open(os.path.join(self.directory, name), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def save_extra(self, name: str, document: dict) -> None:
        write_atomic(os.path.join(self.directory, name), json.dumps(document).encode())

    def channel_path(self, snapshot_id: str) -> str:
        return os.path.join(self.directory, snapshot_id, CHANNEL)

    def delete(self, snapshot_id: str) -> None:
        self.manifests.pop(snapshot_id, None)
        self._saved.pop(snapshot_id, None)
        self._landed.pop(snapshot_id, None)
        shutil.rmtree(os.path.join(self.directory, snapshot_id), ignore_errors=True)

    def _write_manifest(self, manifest: dict) -> None:
        self._put_manifest(manifest, lambda function: function())

    def _put_manifest(self, manifest: dict, run_blocking: Callable[[Callable[[], object]], object]) -> bool:
        """Write ``manifest`` atomically, its fsyncs through ``run_blocking``; renamed into place unless a
        later save of the same snapshot landed while its file was written (the saves are numbered on
        the caller's one thread: no lock). Whether it landed."""
        snapshot_id = manifest["id"]
        generation = self._saved[snapshot_id] = self._saved.get(snapshot_id, 0) + 1
        directory = os.path.join(self.directory, snapshot_id)
        path = os.path.join(directory, MANIFEST)
        data = (json.dumps(manifest, sort_keys=True) + "\n").encode()  # C encoder: not indented
        tmp = run_blocking(lambda: write_temp(path, data))
        if self._landed.get(snapshot_id, 0) > generation:
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
        self._landed[snapshot_id] = generation
        run_blocking(lambda: fsync_dir(directory))
        return True
